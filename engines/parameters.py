"""The calculation parameters every engine understands, as a pydantic model.

Each engine adds its own ``options`` model; :mod:`atomforge.engines.registry` builds one
parameters model per engine from this base, discriminated by ``engine``, so the Prefect
UI's run form shows the chosen engine's options with their types and descriptions.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class CalculationKind(str, Enum):
    """What to compute for each structure."""

    singlepoint = "singlepoint"
    optimize = "optimize"
    md = "md"


class CalculationParameters(BaseModel):
    """How to compute a structure: the fields every engine shares, then its own options."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(description="The engine that computes each structure.")
    kind: CalculationKind = Field(
        CalculationKind.optimize,
        description="singlepoint, optimize (geometry; with relax_cell also the cell) or md.",
    )
    charge: int = Field(0, description="Total charge of the system in e (molecular engines).")
    multiplicity: int = Field(1, ge=1, description="Spin multiplicity 2S+1 (molecular engines).")
    cores: int = Field(
        1,
        ge=1,
        description="Cores per structure: MPI ranks for pw.x, lmp and VASP, OpenMP threads "
        "for xtb and tblite. A run never puts more cores to work than its workers have.",
    )
    forces: bool = Field(True, description="Compute and store forces on the final geometry.")
    fmax: float = Field(
        0.01,
        gt=0,
        description="Optimization converges when every force is below this (eV/Å); the "
        "engines that optimize with ASE or LAMMPS use it, xtb uses its opt_level.",
    )
    max_steps: int = Field(500, ge=1, description="Most optimization steps.")
    relax_cell: bool = Field(
        False, description="Also relax the cell of periodic structures (kind optimize)."
    )
    timeout_seconds: float = Field(
        3600, gt=0, description="Wall-clock limit per structure; the engine is killed past it."
    )
    options: BaseModel = Field(description="The engine's own options.")
