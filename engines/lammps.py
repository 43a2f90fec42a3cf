"""The ``lammps`` engine: LAMMPS (``lmp``) with a classical potential, as an external process.

Template: ASE writes the data file (``write_lammps_data``, metal units) and reads the dumps;
:mod:`.lammps_input` writes the script and :mod:`.lammps_output` reads the log. LAMMPS wants
a lower-triangular box, so the cell is rotated with ASE's ``Prism`` on the way in, and
positions, forces, cell and stress are rotated back on the way out. Profile:
:class:`LammpsProfile` says which ``lmp`` and where the potential files are.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

from ase import Atoms
from ase.calculators.lammps import Prism
from ase.io import read, write
from ase.io.lammpsdata import write_lammps_data
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atomforge.engines import lammps_output as output
from atomforge.engines.base import Command, ContinueOptimization, Engine, EngineResults, Problem
from atomforge.engines.errors import InputError
from atomforge.engines.lammps_input import (
    DATA,
    FINAL_DUMP,
    LOG,
    SCRIPT,
    TRAJ_DUMP,
    LammpsOptions,
    input_script,
    pair_lines,
    pair_style_of,
    potential_elements,
)
from atomforge.engines.mpi import MpiProfile
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.status import JobStatus

INPUT_ATOMS = "lammps-input.extxyz"
"""The structure the inputs were written from: its cell orients the results back."""
TRAJECTORY = "trajectory.extxyz"
THERMO_COLUMNS = {
    "Step": "step",
    "Time": "time_ps",
    "Temp": "temperature_K",
    "PotEng": "potential_energy_eV",
    "KinEng": "kinetic_energy_eV",
    "TotEng": "total_energy_eV",
    "Press": "pressure_bar",
    "Volume": "volume_A3",
}
"""Thermo keywords kept for kind md, and their names in ``properties["thermo"]``."""


class LammpsProfile(BaseSettings):
    """How to launch LAMMPS: ``ATOMFORGE_LAMMPS_COMMAND`` and ``_POTENTIAL_DIR``."""

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_LAMMPS_")

    command: str = Field("lmp", description="The LAMMPS executable (Debian ships only lmp).")
    potential_dir: Path = Field(
        Path("/usr/share/lammps/potentials"), description="Folder of potential files."
    )

    def potential_path(self, potential: str) -> Path:
        """Return the absolute path of ``potential``: a name in the folder, or a path."""
        if "/" in potential:
            return Path(potential).expanduser().absolute()
        return self.potential_dir / potential


@cache
def _lammps_version(command: str) -> str:
    """Return the version ``lmp -h`` reports, e.g. ``29 Sep 2021 - Update 2``."""
    try:
        out = subprocess.run(
            [command, "-h"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return "unknown"
    return output.lammps_version(out) or "unknown"


class LammpsEngine(Engine):
    """LAMMPS with a classical potential, one (MPI) process per structure; periodic cells."""

    name = "lammps"
    outputs = frozenset({"pressure_GPa"})
    description = "LAMMPS (lmp) with EAM, Stillinger-Weber, Tersoff or any pair_style"
    requires = "the lmp program (Debian package lammps) and its potential files"
    options_model = LammpsOptions
    kinds = frozenset(CalculationKind)
    supports_molecules = False
    supports_charge = False
    supports_cell_relaxation = True
    handlers = (ContinueOptimization(),)
    log_name = "lammps.out"

    def __init__(self, profile: LammpsProfile | None = None) -> None:
        self.profile = profile or LammpsProfile()

    def check_installed(self, params: CalculationParameters) -> None:
        """Raise InputError when lmp, the potential folder or the potential file is missing."""
        if shutil.which(self.profile.command) is None:
            raise InputError(
                f"lammps: program {self.profile.command!r} not found: "
                "set ATOMFORGE_LAMMPS_COMMAND to the lmp executable"
            )
        opts: LammpsOptions = params.options
        if opts.potential and "/" not in opts.potential and not self.profile.potential_dir.is_dir():
            raise InputError(
                f"lammps: no potential folder {self.profile.potential_dir}: "
                "set ATOMFORGE_LAMMPS_POTENTIAL_DIR"
            )
        self._potential(opts)

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError for a cell not periodic in 3D, contradictory options, or an
        element the potential lacks (see :meth:`Engine.check`)."""
        super().check(atoms, params)
        opts: LammpsOptions = params.options
        problem = opts.problem(params.kind)
        if params.relax_cell and opts.min_style == "fire":
            problem = "min_style fire cannot relax the cell (use cg)"
        if not atoms.pbc.all():
            problem = "needs a cell periodic in all three directions"
        if problem:
            raise InputError(f"lammps: {problem}")
        path = self._potential(opts)
        covered = potential_elements(path) if path is not None else None
        missing = [s for s in self._species(atoms, opts) if covered and s not in covered]
        if covered and missing:
            raise InputError(
                f"lammps: element {missing[0]} is not in potential {path.name} "
                f"(has: {', '.join(sorted(covered))})"
            )

    def _potential(self, opts: LammpsOptions) -> Path | None:
        """Return the potential file of ``opts`` (None with pair_style); InputError if missing."""
        if opts.potential is None:
            return None
        path = self.profile.potential_path(opts.potential)
        if not path.is_file():
            raise InputError(f"lammps: no potential file {path}")
        pair_style_of(path)
        return path

    def _species(self, atoms: Atoms, opts: LammpsOptions) -> list[str]:
        """Return the elements in the order of atom types; InputError if ``elements`` lacks one."""
        present = sorted(set(atoms.get_chemical_symbols()))
        if opts.elements is None:
            return present
        missing = [s for s in present if s not in opts.elements]
        if missing:
            raise InputError(f"lammps: element {missing[0]} is not in options.elements")
        return list(opts.elements)

    def write_inputs(self, atoms: Atoms, params: CalculationParameters, directory: Path) -> None:
        """Write the data file, the input script and the structure they were written from."""
        opts: LammpsOptions = params.options
        species = self._species(atoms, opts)
        for name in (FINAL_DUMP, TRAJ_DUMP, LOG, TRAJECTORY):
            (directory / name).unlink(missing_ok=True)
        write(directory / INPUT_ATOMS, atoms, format="extxyz")
        prism = Prism(atoms.cell.array, atoms.pbc, reduce_cell=True)
        with (directory / DATA).open("w") as fd:
            write_lammps_data(fd, atoms, specorder=species, prismobj=prism, masses=True)
        pair = pair_lines(opts, self._potential(opts), species)
        (directory / SCRIPT).write_text(input_script(params, pair))

    def command(self, params: CalculationParameters, directories: list[Path]) -> Command:
        """Return ``lmp -in in.lmp`` (under mpirun for ``cores`` > 1); the screen is the log."""
        argv = [self.profile.command, "-in", SCRIPT, "-log", LOG, "-nocite"]
        mpi = MpiProfile()
        return Command(mpi.argv(argv, params.cores), mpi.env())

    def diagnose(
        self, directory: Path, params: CalculationParameters, status: JobStatus
    ) -> Problem | None:
        """Return a LAMMPS error, missing results, or a minimization out of iterations."""
        screen = (directory / self.log_name).read_text(errors="replace")
        errors = output.error_lines(screen)
        if errors:
            return Problem("lammps_error", f"lammps: {errors[0]}")
        if not status.completed:
            return None
        if not (directory / FINAL_DUMP).exists():
            return Problem("no_results", "lammps wrote no final dump")
        if params.kind is not CalculationKind.optimize:
            return None
        criterion = output.stopping_criterion((directory / LOG).read_text(errors="replace"))
        if criterion == "max iterations":
            return Problem(
                "optimization_not_converged",
                f"lammps: minimization not converged in {params.max_steps} iterations",
            )
        return None

    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return energy, forces, stress and final structure; for md also thermo and trajectory."""
        structure = read(directory / INPUT_ATOMS, format="extxyz")
        species = self._species(structure, params.options)
        text = (directory / LOG).read_text(errors="replace")
        table = output.read_thermo(text)[-1]
        last = {name: column[-1] for name, column in table.items()}
        final = output.read_dump(directory / FINAL_DUMP, structure, species)[-1]
        forces = final.get_forces()
        final.calc = None
        results = EngineResults(
            energy=last["PotEng"],
            atoms=final,
            forces=forces,
            stress=output.stress_of(last, structure),
        )
        if params.kind is CalculationKind.optimize:
            criterion = output.stopping_criterion(text)
            results.converged = criterion in output.CONVERGED_CRITERIA
            results.n_steps = output.minimize_iterations(text)
            results.properties["stopping_criterion"] = criterion
        if params.kind is CalculationKind.md:
            results.n_steps = int(last["Step"])
            results.properties["thermo"] = {
                key: table[name] for name, key in THERMO_COLUMNS.items()
            }
            frames = output.read_dump(directory / TRAJ_DUMP, structure, species)
            output.add_energies(frames, table, params.options.thermo_every)
            write(directory / TRAJECTORY, frames, format="extxyz")
        return results

    def version(self) -> str:
        """Return the LAMMPS version, e.g. ``29 Sep 2021 - Update 2``."""
        return _lammps_version(self.profile.command)
