"""The ``vasp`` engine: VASP as an external MPI program, one process per structure.

Template: ASE's ``GenerateVaspInput`` writes INCAR, POSCAR, KPOINTS and POTCAR (atoms
sorted by element, the order kept in ``ase-sort.dat``); ASE reads ``vasprun.xml``, or
``OUTCAR`` when there is none. Profile: :class:`VaspProfile` says how to launch VASP and
where its POTCARs are. VASP is licensed: without it every step but the run is testable.

ASE's VASP modules are imported where they are used: importing them imports matplotlib
(through ``ase.vibrations``), 0.4 s of every process that loads the engine registry.
"""

from __future__ import annotations

import os
import shlex
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

import numpy as np
from ase import Atoms
from ase.config import ASEEnvDeprecationWarning
from ase.io import read
from pydantic import Field, field_validator, model_validator
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
from atomforge.engines.errors import InputError
from atomforge.engines.mpi import MpiProfile
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.status import JobStatus

if TYPE_CHECKING:
    from ase.calculators.vasp.create_input import GenerateVaspInput

POTCAR_FAMILIES = {"pbe": "potpaw_PBE", "lda": "potpaw"}
OUTPUT_FILES = ("vasprun.xml", "OUTCAR", "CONTCAR")
DEFAULT_KSPACING = 0.5
"""VASP's own KSPACING default (1/Å), written out when neither kpts nor kspacing is given."""
DEFAULT_NELM = 60
MAX_NELM = 480
ALGO_LADDER = ("VeryFast", "Fast", "Normal", "All")
"""ALGO values from cheapest to most robust (VASP's default is Normal)."""


class VaspOptions(EngineOptions):
    """Options of VASP; ``incar`` takes any other INCAR tag."""

    xc: str = Field("PBE", description="ASE's xc recipe (PBE, LDA, PBEsol, r2SCAN, HSE06, ...).")
    encut: float | None = Field(None, gt=0, description="Plane-wave cutoff ENCUT in eV.")
    kpts: list[int] | None = Field(
        None, description="Monkhorst-Pack grid, '4,4,4' or [4, 4, 4] (KPOINTS file)."
    )
    kspacing: float | None = Field(
        None, gt=0, description="KSPACING in 1/Å instead of kpts; VASP's 0.5 if neither."
    )
    ismear: int | None = Field(None, ge=-5, description="Smearing method ISMEAR.")
    sigma: float | None = Field(None, gt=0, description="Smearing width SIGMA in eV.")
    ispin: int | None = Field(None, ge=1, le=2, description="ISPIN: 2 for spin-polarized.")
    setups: str | dict[str, str] | None = Field(
        None, description="ASE's POTCAR setups: 'minimal', 'recommended', 'GW' or a dict."
    )
    incar: dict[str, Any] = Field(
        default_factory=dict, description="Any other INCAR tag, e.g. {'algo': 'All'}; wins."
    )

    @field_validator("kpts", mode="before")
    @classmethod
    def _split_kpts(cls, value: Any) -> Any:
        """Return a '4,4,4' or '4 4 4' string as a list of three numbers."""
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if value is not None and len(value) != 3:
            raise ValueError("kpts needs three numbers, e.g. '4,4,4'")
        return value

    @field_validator("xc")
    @classmethod
    def _known_xc(cls, value: str) -> str:
        """Return ``value`` if ASE has a recipe for it."""
        from ase.calculators.vasp.create_input import GenerateVaspInput

        if value.lower() not in GenerateVaspInput.xc_defaults:
            raise ValueError(f"unknown xc {value!r} (ASE's recipes: PBE, LDA, PBEsol, ...)")
        return value

    @field_validator("setups")
    @classmethod
    def _known_setups(cls, value: str | dict[str, str] | None) -> str | dict[str, str] | None:
        """Return ``value`` if ASE knows the setups it names."""
        from ase.calculators.vasp.create_input import get_pp_setup

        try:
            get_pp_setup(value)
        except (KeyError, ValueError):
            message = f"unknown setups {value!r} (minimal, recommended, GW or a dict)"
            raise ValueError(message) from None
        return value

    @field_validator("incar")
    @classmethod
    def _lower_tags(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Return the tags lower-cased, as ASE takes them, once ASE has accepted them."""
        from ase.calculators.vasp.create_input import GenerateVaspInput

        tags = {key.lower(): item for key, item in value.items()}
        try:
            GenerateVaspInput().set(**tags)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return tags

    @model_validator(mode="after")
    def _one_k_grid(self) -> VaspOptions:
        """Return the options unless both kpts and kspacing are given."""
        if self.kpts is not None and self.kspacing is not None:
            raise ValueError("give kpts or kspacing, not both")
        return self


class VaspProfile(BaseSettings):
    """How to launch VASP (``ATOMFORGE_VASP_COMMAND``) and where its POTCARs are."""

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_VASP_")

    command: str = Field("vasp_std", description="The VASP program, with any arguments.")
    pp_path: Path | None = Field(
        default_factory=lambda: os.environ.get("VASP_PP_PATH") or None,
        description="Folder holding potpaw_PBE/ and potpaw/ (default: $VASP_PP_PATH).",
    )


class StrongerScf(Handler):
    """The SCF hit NELM: a more robust ALGO, then (at ALGO=All) twice the NELM, as custodian."""

    fixes = "scf_not_converged"

    def correct(self, engine, directory, params, problem) -> Correction | None:
        """Return the next ALGO of :data:`ALGO_LADDER`, else NELM doubled; None past MAX_NELM."""
        incar = dict(params.options.incar)
        ladder = [algo.lower() for algo in ALGO_LADDER]
        algo = str(incar.get("algo", "Normal")).lower()
        if algo in ladder[:-1]:
            incar["algo"] = ALGO_LADDER[ladder.index(algo) + 1]
            return Correction(f"ALGO {incar['algo']}", options={"incar": incar})
        incar["nelm"] = 2 * int(incar.get("nelm", DEFAULT_NELM))
        if incar["nelm"] > MAX_NELM:
            return None
        return Correction(f"NELM {incar['nelm']}", options={"incar": incar})


def _kind_tags(params: CalculationParameters) -> dict[str, Any]:
    """Return the INCAR tags of the calculation kind."""
    if params.kind is CalculationKind.singlepoint:
        return {"nsw": 0, "ibrion": -1}
    isif = 3 if params.relax_cell else 2
    return {"ibrion": 2, "nsw": params.max_steps, "ediffg": -params.fmax, "isif": isif}


def _option_tags(opts: VaspOptions) -> dict[str, Any]:
    """Return the ASE keywords of the typed options that are set, with one k-point grid."""
    tags = {
        "encut": opts.encut,
        "ismear": opts.ismear,
        "sigma": opts.sigma,
        "ispin": opts.ispin,
        "setups": opts.setups,
    }
    tags = {key: value for key, value in tags.items() if value is not None}
    if opts.kpts:
        return tags | {"kpts": opts.kpts}
    return tags | {"kpts": None, "kspacing": opts.kspacing or DEFAULT_KSPACING}


def _nsw(params: CalculationParameters) -> int:
    """Return the most ionic steps VASP was allowed (NSW)."""
    return int(params.options.incar.get("nsw", params.max_steps))


def _resort(directory: Path) -> np.ndarray | slice:
    """Return the indices that put VASP's element-sorted atoms back in input order."""
    path = directory / "ase-sort.dat"
    return np.loadtxt(path, dtype=int, ndmin=2)[:, 1] if path.exists() else slice(None)


def _frames(directory: Path) -> list[Atoms]:
    """Return every ionic step of ``vasprun.xml`` (else ``OUTCAR``), each with its results."""
    xml = directory / "vasprun.xml"
    if xml.exists():
        return read(xml, index=":", format="vasp-xml")
    return read(directory / "OUTCAR", index=":", format="vasp-out")


def _generator_version(xml: Path) -> str | None:
    """Return the VASP version in the ``<generator>`` block of ``xml``, e.g. ``6.3.0``."""
    for _, element in ElementTree.iterparse(xml):
        if element.tag == "i" and element.get("name") == "version":
            return (element.text or "").strip()
        if element.tag == "generator":
            return None
    return None


def _scf_converged(directory: Path) -> bool | None:
    """Return whether the last SCF of ``OUTCAR`` converged (ASE's test), None without one.

    ASE stops at the first VASP 6 "aborting loop" line, so the lines start at the last.
    """
    path = directory / "OUTCAR"
    if not path.exists():
        return None
    lines = path.read_text(errors="replace").splitlines()
    aborts = [i for i, line in enumerate(lines) if "aborting loop" in line]
    from ase.calculators.vasp import Vasp

    return Vasp().read_convergence(lines[aborts[-1] :] if aborts else lines)


class VaspEngine(Engine):
    """VASP through ASE's input writer and readers, one (MPI) process per structure."""

    name = "vasp"
    outputs = frozenset({"fermi_level_eV", "pressure_GPa", "magnetic_moment"})
    max_atoms = 2000
    description = "VASP plane-wave DFT (licensed program); periodic structures"
    requires = "the VASP program (ATOMFORGE_VASP_COMMAND) and POTCARs (VASP_PP_PATH)"
    options_model = VaspOptions
    supports_molecules = False
    supports_charge = False
    supports_cell_relaxation = True
    handlers = (StrongerScf(), ContinueOptimization())
    log_name = "vasp.out"

    def __init__(self, profile: VaspProfile | None = None) -> None:
        self.profile = profile or VaspProfile()

    def check_installed(self, params: CalculationParameters) -> None:
        """Raise InputError with one line if the VASP program or the POTCAR folder is missing."""
        program = (shlex.split(self.profile.command) or [""])[0]
        if shutil.which(program) is None:
            raise InputError(
                f"vasp: program {program!r} not found: install VASP or set "
                "ATOMFORGE_VASP_COMMAND (e.g. 'vasp_std' or a full path)"
            )
        pp_path = self.profile.pp_path
        if pp_path is None or not pp_path.is_dir():
            raise InputError(
                f"vasp: POTCAR folder {str(pp_path or 'unset')!r} not found: set VASP_PP_PATH "
                "(or ATOMFORGE_VASP_PP_PATH) to the folder holding potpaw_PBE/"
            )

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError if a POTCAR is missing (see :meth:`Engine.check` for the rest)."""
        super().check(atoms, params)
        if self.profile.pp_path is not None:
            self._generator(atoms, params)

    def _generator(self, atoms: Atoms, params: CalculationParameters) -> GenerateVaspInput:
        """Return ASE's VASP input writer set up for ``atoms``, its POTCARs found."""
        from ase.calculators.vasp.create_input import GenerateVaspInput

        opts: VaspOptions = params.options
        if self.profile.pp_path is None:
            raise InputError("vasp: no POTCAR folder: set VASP_PP_PATH")
        gen = GenerateVaspInput()
        gen.set(xc=opts.xc)
        family = POTCAR_FAMILIES[gen.input_params["pp"].lower()]
        gen.set(pp=str(self.profile.pp_path.resolve() / family))
        gen.set(**(_kind_tags(params) | _option_tags(opts) | opts.incar))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ASEEnvDeprecationWarning)
                gen.initialize(atoms)
        except RuntimeError as exc:
            raise InputError(f"vasp: POTCAR not found: {str(exc).splitlines()[0]}") from None
        return gen

    def write_inputs(self, atoms: Atoms, params: CalculationParameters, directory: Path) -> None:
        """Write INCAR, POSCAR, KPOINTS, POTCAR and ase-sort.dat; remove earlier outputs."""
        for name in OUTPUT_FILES:
            (directory / name).unlink(missing_ok=True)
        self._generator(atoms, params).write_input(atoms, str(directory))

    def command(self, params: CalculationParameters, directories: list[Path]) -> Command:
        """Return the VASP command line, under ``mpirun -np cores`` for more than one core."""
        mpi = MpiProfile()
        return Command(mpi.argv(shlex.split(self.profile.command), params.cores), mpi.env())

    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return energy, forces, stress, moments, Fermi level and structure, in input order."""
        frames = _frames(directory)
        last, order = frames[-1], _resort(directory)
        results = last.calc.results
        magmoms = results.get("magmoms")
        converged = None
        if params.kind is CalculationKind.optimize:
            converged = self._relaxed(frames, params)
        xml = directory / "vasprun.xml"
        atoms = last.copy()
        atoms.calc = None
        return EngineResults(
            energy=float(results["energy"]),
            atoms=atoms[order],
            forces=results["forces"][order] if "forces" in results else None,
            stress=results.get("stress"),
            magmoms=None if magmoms is None else magmoms[order],
            magmom=results.get("magmom"),
            fermi_level=last.calc.get_fermi_level(),
            converged=converged,
            n_steps=len(frames),
            version=_generator_version(xml) if xml.exists() else None,
            properties={"free_energy": results.get("free_energy")},
        )

    def _relaxed(self, frames: list[Atoms], params: CalculationParameters) -> bool:
        """Return True if VASP stopped before NSW or the last forces are below fmax."""
        forces = frames[-1].calc.results.get("forces")
        small = forces is not None and np.linalg.norm(forces, axis=1).max() <= params.fmax
        return len(frames) < _nsw(params) or bool(small)

    def diagnose(
        self, directory: Path, params: CalculationParameters, status: JobStatus
    ) -> Problem | None:
        """Return the problem of a run that exited 0: SCF at NELM, relaxation at NSW, no output.

        A failed run keeps the message the run loop took from its log.
        """
        if not status.completed:
            return None
        if _scf_converged(directory) is False:
            nelm = params.options.incar.get("nelm", DEFAULT_NELM)
            return Problem("scf_not_converged", f"vasp: SCF not converged in NELM={nelm} steps")
        if not any((directory / name).exists() for name in OUTPUT_FILES[:2]):
            return Problem("no_results", "vasp wrote neither vasprun.xml nor OUTCAR")
        if params.kind is CalculationKind.optimize and not self._relaxed(
            _frames(directory), params
        ):
            return Problem(
                "optimization_not_converged",
                f"vasp: relaxation not converged in NSW={_nsw(params)} steps",
            )
        return None

    def last_geometry(self, directory: Path, params: CalculationParameters) -> Atoms | None:
        """Return CONTCAR (else the last ionic step) in input order, or None without output."""
        contcar = directory / "CONTCAR"
        if contcar.exists() and contcar.stat().st_size:
            return read(contcar, format="vasp")[_resort(directory)]
        if not any((directory / name).exists() for name in OUTPUT_FILES[:2]):
            return None
        return self.read_results(directory, params).atoms

    def version(self) -> str:
        """Return ``unknown``: the binary is not asked; each result carries its vasprun's."""
        return "unknown"
