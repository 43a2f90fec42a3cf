"""Pydantic models of flow parameters and result documents (the Prefect UI renders these)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atomforge.engines.registry import make_parameters
from atomforge.engines.status import Status
from atomforge.flows.form import simulation_parameters_model

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_PARAMETERS",
    "RunOptions",
    "RunSummary",
    "SimulationParameters",
    "StructureResult",
    "StructureSource",
    "make_parameters",
]

SimulationParameters = simulation_parameters_model()
"""The flows' parameters form: the engine, shared fields, one options block per engine.

``make_parameters("xtb", kind="singlepoint")`` builds the engine's own model, which the
flows take as well; ``SimulationParameters(...).resolve()`` turns the form into it.
"""


class StructureSource(BaseModel):
    """Where the structures come from; give exactly one of: a file or folder path, inline
    XYZ/extended-XYZ text, or stored results (their final structures)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="Structure file (xyz, extxyz, cif, POSCAR...) or a folder of them."
    )
    text: str | None = Field(None, description="Inline structure text, e.g. an XYZ block.")
    format: str | None = Field(None, description="ASE format name when it cannot be guessed.")
    results: list[str] | None = Field(
        None,
        description="Stored results ('flow_run_id/id') whose final structures to compute; "
        "each new result records the one it started from as its parent.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StructureSource:
        if sum(given is not None for given in (self.path, self.text, self.results)) != 1:
            raise ValueError("give exactly one of 'path', 'text' or 'results'")
        return self


class RunOptions(BaseModel):
    """Where a run works and how a screen splits its structures."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str | None = Field(
        None,
        description="Folder under the work root for this run's working directories "
        "(default: the flow run id). Must stay inside the work root.",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="About this many structures per Dask task (default: one chunk per worker).",
    )
    skip_invalid: bool = Field(
        False, description="Screen: report invalid structures and go on instead of failing."
    )
    reuse: bool | None = Field(
        None,
        description="Reuse a stored completed result whose inputs are identical (structure, "
        "engine and version, parameters) instead of computing it again; default: "
        "ATOMFORGE_REUSE (true).",
    )
    max_failed_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Screen: end Failed when more than this fraction of the structures it "
        "computed did not complete (invalid ones skipped with skip_invalid do not count); "
        "default: ATOMFORGE_MAX_FAILED_FRACTION (0.5).",
    )

    @field_validator("run_dir")
    @classmethod
    def _inside_work_root(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = PurePath(value)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"run_dir {value!r} must be a relative path inside the work root")
        return value


class StructureResult(BaseModel):
    """Everything known about one structure's calculation: inputs, engine, outputs, files."""

    id: str
    flow_run_id: str
    flow_name: str
    index: int
    name: str
    status: Status
    message: str = ""
    engine: str
    engine_version: str = ""
    parameters: dict[str, Any]
    formula: str
    n_atoms: int
    input_structure: str = Field(description="Input structure as extended XYZ.")
    energy_eV: float | None = None
    energy_hartree: float | None = None
    energy_per_atom_eV: float | None = None
    gap_eV: float | None = None
    fermi_level_eV: float | None = None
    max_force_eV_per_A: float | None = None
    stress_eV_per_A3: list[float] | None = Field(
        None, description="Stress in Voigt order xx, yy, zz, yz, xz, xy (ASE's sign convention)."
    )
    pressure_GPa: float | None = None
    magnetic_moment: float | None = Field(None, description="Total magnetic moment (μB).")
    magnetic_moments: list[float] | None = Field(None, description="Per-atom moments (μB).")
    converged: bool | None = None
    n_steps: int | None = None
    final_structure: str | None = Field(None, description="Final structure as extended XYZ.")
    forces_eV_per_A: list[list[float]] | None = None
    input_key: str | None = Field(
        None, description="Hash of the inputs (structure, engine and version, parameters)."
    )
    reused_from: str | None = Field(
        None, description="'flow_run_id/id' of the stored result reused instead of computing."
    )
    parent_id: str | None = Field(
        None,
        description="'flow_run_id/id' of the result whose final structure this one started from.",
    )
    workflow_run_id: str | None = Field(None, description="The workflow run this belongs to.")
    step: str | None = Field(None, description="The workflow step that computed it.")
    corrections: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Each correction an error handler made: problem, message, action, options.",
    )
    properties: dict[str, Any] = Field(default_factory=dict)
    wall_seconds: float = 0.0
    host: str | None = Field(None, description="The machine the engine ran on.")
    batch_job: str | None = Field(None, description="The SLURM job it ran in, if any.")
    workdir: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def ok(self) -> bool:
        """Return True when the calculation completed."""
        return self.status is Status.completed

    @property
    def ref(self) -> str:
        """Return the reference of this result in the store: ``flow_run_id/id``."""
        return f"{self.flow_run_id}/{self.id}"


class RunSummary(BaseModel):
    """One flow run: what it was asked, how it ended, and the ids of its results."""

    flow_run_id: str
    flow_name: str
    state: str
    message: str = ""
    engine: str
    parameters: dict[str, Any]
    source: dict[str, Any]
    n_structures: int = 0
    n_completed: int = 0
    result_ids: list[str] = Field(default_factory=list)
    work_dir: str
    started_at: datetime
    finished_at: datetime | None = None
    workflow_run_id: str | None = None
    step: str | None = None


DEFAULT_PARAMETERS = SimulationParameters()
DEFAULT_OPTIONS = RunOptions()
