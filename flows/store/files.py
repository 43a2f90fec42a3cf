"""The results store: one JSON document per structure and one per run, queryable afterwards.

Layout: ``<results_root>/<flow_run_id>/run.json`` and ``<results_root>/<flow_run_id>/<id>.json``.
Every write goes to a temporary file first and is renamed into place, so a crash or a
concurrent run never leaves a half-written document.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from atomforge.engines.errors import InputError
from atomforge.flows.store.index import ResultFilter, index_result, query_index
from atomforge.flows.store.records import RunSummary, StructureResult

if TYPE_CHECKING:
    from atomforge.engines.structures import NamedStructure

RUN_FILE = "run.json"


def write_json(path: Path, document: BaseModel) -> Path:
    """Write ``document`` as JSON to ``path`` atomically; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(document.model_dump_json(indent=1))
    os.replace(tmp, path)
    return path


def result_path(root: Path, result: StructureResult) -> Path:
    """Return where the document of ``result`` is stored."""
    return root / result.flow_run_id / f"{result.id}.json"


def save_result(root: Path, result: StructureResult) -> Path:
    """Store one structure's result and index it; return its path."""
    path = write_json(result_path(root, result), result)
    index_result(root, result)
    return path


def load_result(root: Path, flow_run_id: str, result_id: str) -> StructureResult | None:
    """Return one stored result document, or None if it is not there (or unreadable)."""
    path = root / flow_run_id / f"{result_id}.json"
    try:
        return StructureResult.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None


class RunPlan(BaseModel):
    """The structures of a run, each as the document it gets if it never starts."""

    results: list[StructureResult]


def save_plan(path: Path, results: list[StructureResult]) -> Path:
    """Store the plan of a run (its ``not-started`` documents) at ``path``; return it."""
    return write_json(path, RunPlan(results=results))


def load_plan(path: Path) -> list[StructureResult]:
    """Return the documents of a stored run plan, or none if there is none (or unreadable)."""
    try:
        return RunPlan.model_validate_json(path.read_text()).results
    except (OSError, ValidationError):
        return []


def save_run(root: Path, summary: RunSummary) -> Path:
    """Store a run's summary; return its path."""
    return write_json(root / summary.flow_run_id / RUN_FILE, summary)


def load_run(root: Path, flow_run_id: str) -> RunSummary | None:
    """Return the summary of a run, or None if there is none."""
    path = root / flow_run_id / RUN_FILE
    return RunSummary.model_validate_json(path.read_text()) if path.exists() else None


def iter_runs(root: Path) -> Iterator[RunSummary]:
    """Yield every stored run summary, newest first."""
    paths = sorted(root.glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths:
        try:
            yield RunSummary.model_validate_json(path.read_text())
        except (OSError, ValidationError):
            continue


def iter_results(root: Path, flow_run_id: str | None = None) -> Iterator[StructureResult]:
    """Yield stored structure results (of one run, or all), newest run first."""
    pattern = f"{flow_run_id or '*'}/*.json"
    paths = sorted(root.glob(pattern), key=lambda p: (-p.stat().st_mtime, p.name))
    for path in paths:
        if path.name == RUN_FILE:
            continue
        try:
            yield StructureResult.model_validate_json(path.read_text())
        except (OSError, ValidationError, json.JSONDecodeError):
            continue


def query_results(
    root: Path, limit: int | None = None, **filters: str | None
) -> list[StructureResult]:
    """Return stored results matching every filter of :class:`ResultFilter`, newest first,
    found through the index: only the matching documents are read."""
    found = query_index(root, ResultFilter(**filters), limit)
    documents = (load_result(root, run_id, result_id) for run_id, result_id in found)
    return [document for document in documents if document is not None]


def lineage(root: Path, result: StructureResult) -> list[StructureResult]:
    """Return ``result`` and the stored results it started from, parent by parent."""
    chain = [result]
    while chain[-1].parent_id and len(chain) < 1000:
        flow_run_id, _, result_id = chain[-1].parent_id.rpartition("/")
        parent = load_result(root, flow_run_id, result_id)
        if parent is None:
            break
        chain.append(parent)
    return chain


def load_structures(root: Path, refs: list[str]) -> list[NamedStructure]:
    """Return the final structures of the stored results ``refs`` ('flow_run_id/id'), named
    as they were, each with its ``parent_id``; raise InputError for one not stored.
    (ASE's readers are imported here, not with the module: reading results needs none.)"""
    from atomforge.engines.structures import NamedStructure, read_structure_text

    structures = []
    for ref in refs:
        flow_run_id, _, result_id = ref.rpartition("/")
        result = load_result(root, flow_run_id, result_id) if flow_run_id else None
        if result is None:
            raise InputError(f"no stored result {ref!r}")
        text = result.final_structure or result.input_structure
        atoms = read_structure_text(text, "extxyz")[0].atoms
        atoms.calc = None
        structures.append(NamedStructure(result.name, atoms, parent_id=ref))
    return structures
