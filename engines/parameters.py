"""The calculation parameters every engine understands, as a pydantic model."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class CalculationKind(str, Enum):
    """What to compute for each structure."""

    singlepoint = "singlepoint"
    optimize = "optimize"


OptionValue = str | int | float | bool


class CalculationParameters(BaseModel):
    """How to compute a structure: the same fields for every engine.

    Engine-specific knobs (for example ``method``, ``accuracy``, ``solvent`` for xTB)
    go into ``options``; each engine rejects options it does not know.
    """

    model_config = ConfigDict(extra="forbid")

    kind: CalculationKind = Field(
        CalculationKind.optimize, description="Single point or geometry optimization."
    )
    charge: int = Field(0, description="Total charge of the system in e.")
    multiplicity: int = Field(1, ge=1, description="Spin multiplicity 2S+1.")
    forces: bool = Field(True, description="Compute and store forces on the final geometry.")
    fmax: float = Field(
        0.01, gt=0, description="Optimization converges when every force is below this (eV/A)."
    )
    max_steps: int = Field(500, ge=1, description="Most optimization steps.")
    relax_cell: bool = Field(
        False, description="Also relax the cell of periodic structures (ASE engines only)."
    )
    timeout_seconds: float = Field(
        3600, gt=0, description="Wall-clock limit per structure; the engine is killed past it."
    )
    options: dict[str, OptionValue] = Field(
        default_factory=dict, description="Engine-specific options, e.g. {'method': 'GFN1-xTB'}."
    )
