"""How MPI programs (pw.x, lmp, VASP) are launched: ``mpirun -np N`` from the system."""

from __future__ import annotations

import os
import shutil

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MpiProfile(BaseSettings):
    """The MPI launcher: ``ATOMFORGE_MPI_LAUNCHER`` (default: the ``mpirun`` on PATH).

    Each rank gets one OpenMP thread. As root, OpenMPI refuses to start unless told it
    may, so the two variables that allow it are set for root only.
    """

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_MPI_")

    launcher: str = Field("mpirun", description="The MPI launcher program.")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra launcher arguments, e.g. ['--bind-to', 'none']."
    )

    def argv(self, program: list[str], cores: int) -> list[str]:
        """Return ``program`` under the launcher with ``cores`` ranks (no launcher for 1)."""
        if cores <= 1:
            return program
        launcher = shutil.which(self.launcher) or self.launcher
        return [launcher, "-np", str(cores), *self.extra_args, *program]

    def env(self) -> dict[str, str]:
        """Return the environment an MPI program needs: one thread per rank."""
        env = {"OMP_NUM_THREADS": "1"}
        if os.geteuid() == 0:
            env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        return env
