"""What a workflow is: a source of structures and an ordered list of steps, from YAML or JSON.

Every check a spec can fail runs when it is built, before any engine starts: an unknown
field or engine, a kind the engine cannot compute, a ``select`` on a field the step before
does not produce, an empty step list, two steps of the same name.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from atomforge.engines.errors import InputError
from atomforge.engines.registry import engine_classes, validation_line
from atomforge.flows.models import RunOptions, SimulationParameters, StructureSource
from atomforge.flows.workflows.select import ALWAYS_PRODUCED, Select

STEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StepBase(SimulationParameters):
    """What a step adds to the parameters form: its name, its selection, where it runs."""

    def parameters(self) -> dict[str, Any]:
        """Return the step's parameters form as JSON (without name, select, deployment)."""
        return self.model_dump(mode="json", exclude={"name", "select", "deployment", "options"})


@cache
def workflow_step_model() -> type[StepBase]:
    """Return the model of one step: the parameters form plus name, select and deployment."""
    return create_model(
        "WorkflowStep",
        __base__=StepBase,
        __module__=__name__,
        __doc__="One step: a name, what it selects from the step before, how it computes.",
        name=(str, Field(pattern=STEP_NAME, description="The step's name (letters, digits, _.-).")),
        select=(
            Select | None,
            Field(
                None,
                title="select",
                description="Which results of the step before go on (not on step 1).",
            ),
        ),
        deployment=(
            str | None,
            Field(
                None,
                description="Run this step as a run of this deployment of the workflow-step "
                "flow ('workflow-step/<name>'), e.g. on the work pool of the big machines; "
                "default: in the workflow's own process.",
            ),
        ),
    )


WorkflowStep = workflow_step_model()


class WorkflowSpec(BaseModel):
    """A workflow: where the structures come from, and the steps they go through in order."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("workflow", description="A label for the workflow's runs.")
    source: StructureSource = Field(description="The structures the first step computes.")
    steps: list[WorkflowStep] = Field(  # type: ignore[valid-type]
        min_length=1, description="The steps, in order; each takes the one before's results."
    )
    options: RunOptions = Field(
        default_factory=RunOptions, description="Run options every step shares."
    )

    @model_validator(mode="after")
    def _steps_fit_together(self) -> WorkflowSpec:
        names = [step.name for step in self.steps]
        if duplicated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"steps: the name {duplicated[0]!r} is used twice")
        engines = engine_classes()
        for position, step in enumerate(self.steps):
            engine = engines[step.engine]
            if step.kind not in engine.kinds:
                kind = step.kind.value
                raise ValueError(f"step {step.name!r}: {step.engine} cannot compute {kind}")
            if step.select is None:
                continue
            if position == 0:
                raise ValueError(f"step {step.name!r}: the first step has nothing to select from")
            before = self.steps[position - 1]
            produced = ALWAYS_PRODUCED | engines[before.engine].outputs
            if missing := sorted(step.select.fields() - produced):
                raise ValueError(
                    f"step {step.name!r}: select reads {missing[0]}, which {before.engine} "
                    f"(step {before.name!r}) does not produce"
                )
        return self


def parse_spec(data: Any, base: Path | None = None) -> WorkflowSpec:
    """Return ``data`` as a workflow spec, a relative source path taken from ``base``;
    raise InputError with one line saying what is wrong."""
    if not isinstance(data, dict):
        raise InputError("workflow spec: expected a mapping with 'source' and 'steps'")
    path = (data.get("source") or {}).get("path") if isinstance(data.get("source"), dict) else None
    if base is not None and path and not Path(path).expanduser().is_absolute():
        data = {**data, "source": {**data["source"], "path": str((base / path).resolve())}}
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"workflow spec: {validation_line(exc)}") from None


def load_spec(path: str | Path) -> WorkflowSpec:
    """Return the workflow spec in the YAML or JSON file ``path`` (a relative source path
    is relative to the file's folder); raise InputError with one line if it is bad."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise InputError(f"{file}: cannot read workflow spec: {exc.strerror}") from None
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{file}: not valid YAML/JSON: {first}") from None
    return parse_spec(data, file.resolve().parent)
