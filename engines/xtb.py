"""The ``xtb`` engine: the xtb program (GFN2-xTB by default) as an external process.

Template: write ``input.xyz``; read ``xtbout.json``, ``xtbopt.xyz`` and the gradient with
ASE's readers. Profile: :class:`XtbProfile` says how to launch xtb. ``--grad`` writes the
gradient twice; ASE reads ORCA's ``input.engrad`` 14 times faster than the Turbomole
``gradient`` file, and both agree to 3e-11 eV/Å.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Literal

from ase import Atoms
from ase.io import read, write
from ase.io.orca import read_orca_engrad
from ase.units import Hartree as HARTREE_EV
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atomforge.engines.base import (
    Command,
    ContinueOptimization,
    Correction,
    Engine,
    EngineOptions,
    EngineResults,
    Handler,
    Problem,
)
from atomforge.engines.errors import EngineError, InputError
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.status import JobStatus

METHOD_FLAGS = {
    "GFN2-xTB": ["--gfn", "2"],
    "GFN1-xTB": ["--gfn", "1"],
    "GFN0-xTB": ["--gfn", "0"],
    "GFN-FF": ["--gfnff"],
}
INPUT_FILE = "input.xyz"
GRADIENT_FILE = "input.engrad"
BANNER = "* xtb version"
OPT_FAILED = "FAILED TO CONVERGE GEOMETRY OPTIMIZATION"
"""xtb 6.5.1 writes ``.xtboptok`` even then: this line is the one sign of it."""
DEFAULT_ETEMP = 300.0
DEFAULT_ITERATIONS = 250


ALPB_SOLVENTS = Literal[
    "acetone",
    "acetonitrile",
    "aniline",
    "benzaldehyde",
    "benzene",
    "ch2cl2",
    "chcl3",
    "cs2",
    "dioxane",
    "dmf",
    "dmso",
    "ether",
    "ethylacetate",
    "furane",
    "hexandecane",
    "hexane",
    "methanol",
    "nitromethane",
    "octanol",
    "woctanol",
    "phenol",
    "toluene",
    "thf",
    "water",
]
"""The solvents xtb 6.5 has ALPB parameters for (its manual, "Implicit Solvation")."""


class XtbOptions(EngineOptions):
    """Options of the xtb program."""

    method: Literal["GFN2-xTB", "GFN1-xTB", "GFN0-xTB", "GFN-FF"] = Field(
        "GFN2-xTB", description="Hamiltonian or force field."
    )
    opt_level: Literal[
        "crude", "sloppy", "loose", "lax", "normal", "tight", "vtight", "extreme"
    ] = Field("normal", description="Optimization convergence level (xtb --opt LEVEL).")
    accuracy: float | None = Field(
        None, gt=0, le=1000, description="Numerical accuracy multiplier (xtb --acc); default 1."
    )
    electronic_temperature: float | None = Field(
        None, gt=0, description="Electronic temperature in K for Fermi smearing; default 300."
    )
    max_iterations: int | None = Field(
        None, ge=1, description="Most SCC iterations (xtb --iterations); default 250."
    )
    solvent: ALPB_SOLVENTS | None = Field(None, description="ALPB implicit solvent.")


@cache
def stack_unlimited() -> tuple[str, ...]:
    """Return the prefix that runs a program with its stack limit raised to the hard limit.

    xtb keeps large arrays on the stack: with the usual 8 MB limit it dies of a
    segmentation fault past a few thousand atoms (3000 He atoms did), as its manual warns
    (``ulimit -s unlimited``). ``prlimit`` (util-linux) sets the limit and execs the
    program, so its pid stays the engine's. Looked up once per process, not per structure.
    """
    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    limit = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    return ("prlimit", f"--stack={limit}", "--") if shutil.which("prlimit") else ()


class XtbProfile(BaseSettings):
    """How to launch xtb: ``ATOMFORGE_XTB_COMMAND``; OpenMP threads come from ``cores``."""

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_XTB_")

    command: str = Field("xtb", description="The xtb executable.")

    def argv(self, params: CalculationParameters) -> list[str]:
        """Return the xtb command line for ``params``."""
        opts: XtbOptions = params.options
        argv = [*stack_unlimited(), self.command, INPUT_FILE, *METHOD_FLAGS[opts.method], "--json"]
        argv += ["--chrg", str(params.charge), "--uhf", str(params.multiplicity - 1)]
        if params.kind is CalculationKind.optimize:
            argv += ["--opt", opts.opt_level, "--cycles", str(params.max_steps)]
        if params.forces:
            argv.append("--grad")
        flags = {
            "--acc": opts.accuracy,
            "--etemp": opts.electronic_temperature,
            "--iterations": opts.max_iterations,
            "--alpb": opts.solvent,
        }
        for flag, value in flags.items():
            if value is not None:
                argv += [flag, str(value)]
        return argv

    def env(self, cores: int) -> dict[str, str]:
        """Return the environment of an xtb process using ``cores`` OpenMP threads."""
        return {
            "OMP_NUM_THREADS": str(cores),
            "OMP_STACKSIZE": "1G",
            "OMP_MAX_ACTIVE_LEVELS": "1",
        }


class HotterScf(Handler):
    """xtb's SCC did not converge: smear the occupations more and allow more iterations."""

    fixes = "scf_not_converged"

    def correct(self, engine, directory, params, problem) -> Correction:
        """Return the electronic temperature tripled and the iteration limit doubled."""
        opts: XtbOptions = params.options
        etemp = 3 * (opts.electronic_temperature or DEFAULT_ETEMP)
        iterations = 2 * (opts.max_iterations or DEFAULT_ITERATIONS)
        return Correction(
            f"electronic_temperature {etemp:g} K, max_iterations {iterations}",
            options={"electronic_temperature": etemp, "max_iterations": iterations},
        )


@cache
def _xtb_version(command: str) -> str:
    """Return the version xtb reports, e.g. ``6.5.1``."""
    try:
        out = subprocess.run(
            [command, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError as exc:
        raise EngineError(f"xtb: cannot start {command!r}: {exc}") from None
    for line in out.splitlines():
        if "xtb version" in line:
            return line.split("xtb version")[1].split()[0]
    return "unknown"


def _last_run_output(log_path: Path) -> str:
    """Return the output of the last xtb run in ``log_path`` (reruns append to it)."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return text[max(text.rfind(BANNER), 0) :]


def _count_xyz_frames(path: Path, n_atoms: int) -> int:
    """Return how many frames of ``n_atoms`` atoms the multi-frame xyz file ``path`` holds."""
    with path.open("rb") as handle:
        n_lines = sum(1 for line in handle if line.strip())
    return n_lines // (n_atoms + 2)


class XtbEngine(Engine):
    """GFN-xTB through the xtb program, one process per structure."""

    name = "xtb"
    outputs = frozenset({"gap_eV"})
    max_atoms = 10000
    description = "xtb program (GFN2-xTB default); molecules"
    requires = "the xtb program (Debian package xtb)"
    options_model = XtbOptions
    supports_periodic = False
    handlers = (HotterScf(), ContinueOptimization())
    log_name = "xtb.log"

    def __init__(self, profile: XtbProfile | None = None) -> None:
        self.profile = profile or XtbProfile()

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError for what xtb would silently mishandle (see :meth:`Engine.check`)."""
        super().check(atoms, params)
        heavy = [s for s, z in zip(atoms.get_chemical_symbols(), atoms.numbers) if z > 86]
        if heavy:
            raise InputError(
                f"xtb: element {heavy[0]} is beyond radon, which GFN-xTB does not cover"
            )

    def write_inputs(self, atoms: Atoms, params: CalculationParameters, directory: Path) -> None:
        """Write ``input.xyz`` for xtb into ``directory``."""
        write(directory / INPUT_FILE, atoms, format="xyz")

    def command(self, params: CalculationParameters, directories: list[Path]) -> Command:
        """Return the xtb command line, with ``cores`` OpenMP threads."""
        return Command(self.profile.argv(params), self.profile.env(params.cores))

    def diagnose(
        self, directory: Path, params: CalculationParameters, status: JobStatus
    ) -> Problem | None:
        """Return a failed SCC, an unconverged optimization, or missing results."""
        output = _last_run_output(directory / self.log_name)
        if "iterator did not converge" in output:
            return Problem("scf_not_converged", "xtb: SCC did not converge")
        if not status.completed:
            return None
        if not (directory / "xtbout.json").exists():
            return Problem("no_results", "xtb wrote no results")
        optimizing = params.kind is CalculationKind.optimize
        if optimizing and OPT_FAILED in output:
            return Problem(
                "optimization_not_converged",
                f"xtb: optimization not converged in {params.max_steps} steps",
            )
        return None

    def last_geometry(self, directory: Path, params: CalculationParameters) -> Atoms | None:
        """Return the last geometry of an optimization (``xtbopt.xyz``), or None."""
        path = directory / "xtbopt.xyz"
        return read(path, format="xyz") if path.exists() else None

    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return energy, gap, final geometry and forces from xtb's output files."""
        summary = json.loads((directory / "xtbout.json").read_text())
        converged = None
        n_steps = None
        if params.kind is CalculationKind.optimize:
            atoms = read(directory / "xtbopt.xyz", format="xyz")
            converged = OPT_FAILED not in _last_run_output(directory / self.log_name)
            n_steps = _count_xyz_frames(directory / "xtbopt.log", len(atoms))
        else:
            atoms = read(directory / INPUT_FILE, format="xyz")
        forces = None
        if params.forces:
            with (directory / GRADIENT_FILE).open() as fd:
                forces = read_orca_engrad(fd)
        energy_hartree = float(summary["total energy"])
        return EngineResults(
            energy=energy_hartree * HARTREE_EV,
            atoms=atoms,
            forces=forces,
            gap=summary.get("HOMO-LUMO gap/eV"),
            converged=converged,
            n_steps=n_steps,
            properties={
                "dipole_au": summary.get("dipole"),
                "partial_charges": summary.get("partial charges"),
                "method": summary.get("method"),
            },
        )

    def version(self) -> str:
        """Return the xtb version, e.g. ``6.5.1``."""
        return _xtb_version(self.profile.command)
