"""The structures of a run on their way through the steps: jobs, their folders, their run."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ase import Atoms

from atomforge.engines.structures import NamedStructure, to_extxyz
from atomforge.flows.paths import RunPaths


@dataclass
class Job:
    """One structure on its way through the steps."""

    index: int
    name: str
    atoms: Atoms
    directory: Path
    input_key: str | None = None
    parent_id: str | None = None

    @cached_property
    def input_extxyz(self) -> str:
        """Return the input structure as extended XYZ text (computed once)."""
        return to_extxyz(self.atoms)


@dataclass(frozen=True)
class RunContext:
    """What the steps need to know about the flow run they belong to (and the workflow
    step it is, if it is one)."""

    flow_run_id: str
    flow_name: str
    paths: RunPaths
    results_root: Path
    workflow_run_id: str | None = None
    step: str | None = None


def plan_jobs(structures: list[NamedStructure], first_index: int, paths: RunPaths) -> list[Job]:
    """Return one job per structure, numbered from ``first_index``, each with its directory."""
    return [
        Job(index, s.name, s.atoms, paths.work_dir / f"{index:05d}-{s.name}", parent_id=s.parent_id)
        for index, s in enumerate(structures, start=first_index)
    ]


def engine_owner(index: int) -> str:
    """Return the claim owner name of the run-engine task of chunk ``index``."""
    return f"run-engine-{index}"
