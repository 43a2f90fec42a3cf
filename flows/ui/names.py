"""Flow run names that say what a run does: flow, engine and kind, and its structures."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any


def _field(value: Any, name: str) -> Any:
    """Return field ``name`` of a parameter given as a model or as a mapping."""
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


def source_label(source: Any) -> str:
    """Return a short label for a structure source: its file or folder name, 'inline
    structure', or how many stored results it takes."""
    if source is None:
        return "?"
    if path := _field(source, "path"):
        return PurePath(path).name or str(path)
    if results := _field(source, "results"):
        return f"{len(results)} stored result(s)"
    return "inline structure"


def calculation_label(parameters: Any) -> str:
    """Return 'engine kind' of a parameters form (or engine model)."""
    engine = _field(parameters, "engine") or "xtb"
    kind = _field(parameters, "kind") or "optimize"
    return f"{engine} {getattr(kind, 'value', kind)}"


def run_name() -> str:
    """Return the name of the flow run being started, from its flow and parameters, e.g.
    'screen xtb optimize: molecules' or 'refine: tblite optimize, 3 stored result(s)'."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    flow = flow_run.flow_name
    if flow == "workflow":
        spec_file = parameters.get("spec_file")
        spec = parameters.get("spec")
        if spec_file:
            return f"workflow: {PurePath(spec_file).name}"
        name = _field(spec, "name")
        label = name if name and name != "workflow" else source_label(_field(spec, "source"))
        return f"workflow: {label}"
    what = calculation_label(parameters.get("parameters"))
    if flow == "workflow-step":
        return f"{parameters.get('step')}: {what}, {source_label(parameters.get('source'))}"
    if flow == "screen-inbox":
        return f"{flow} {what}: {PurePath(parameters.get('inbox') or 'inbox').name}"
    return f"{flow} {what}: {source_label(parameters.get('source'))}"
