"""The stored records: one structure's result document and one run's summary.

Kept apart from the flow parameters (which build every engine's options form) so that
reading results (``atomforge results``, ``runs``, ``show``) imports pydantic and nothing of
the engines or ASE.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from atomforge.engines.status import Status


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
