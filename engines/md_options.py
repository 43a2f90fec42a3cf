"""The options of kind ``md``, shared by every engine that runs molecular dynamics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atomforge.engines.base import EngineOptions


class MdOptions(EngineOptions):
    """The integrator options of kind ``md``, named as the lammps engine names them."""

    ensemble: Literal["nve", "nvt", "npt"] = Field("nvt", description="MD ensemble (kind md).")
    temperature: float | None = Field(
        None, gt=0, description="MD temperature in K: initial velocities and thermostat."
    )
    pressure: float | None = Field(None, description="NPT target pressure in bar.")
    steps: int = Field(1000, ge=0, description="MD steps.")
    timestep_fs: float = Field(1.0, gt=0, description="MD time step in fs.")
    thermo_every: int = Field(
        10, ge=1, description="Thermo output (and MD trajectory frame) every this many steps."
    )
    seed: int = Field(12345, ge=1, description="Random seed of the initial MD velocities.")

    def md_problem(self) -> str | None:
        """Return what is missing for an MD run with these options, or None."""
        if self.ensemble != "nve" and self.temperature is None:
            return f"ensemble {self.ensemble} needs a temperature"
        if self.ensemble == "npt" and self.pressure is None:
            return "ensemble npt needs a pressure"
        return None
