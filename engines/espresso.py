"""The ``espresso`` engine: Quantum ESPRESSO's pw.x (plane waves, pseudopotentials).

Template: ASE's ``write_espresso_in`` writes ``espresso.pwi``; pw.x's output,
``espresso.pwo``, is read by :mod:`atomforge.engines.espresso_output`. Profile:
:class:`EspressoProfile` says which pw.x and which pseudopotential folder.

Pseudopotentials: pw.x refuses pseudopotentials of different functionals in one input
unless ``input.system.input_dft`` is set, so the defaults (:data:`DEFAULT_PSEUDOPOTENTIALS`)
are all LDA (Perdew-Zunger, ``pz``) files of Debian's quantum-espresso-data. Other elements
take the first ``<El>.*`` file of the folder; a structure whose files mix functionals is
refused at validation.

A non-converged SCF is never a result: pw.x stops with exit code 2, or (with
``scf_must_converge=.false.``) exits 0 with an energy whose estimated accuracy is above the
threshold; both are the ``scf_not_converged`` problem.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.io import write
from ase.units import Bohr, Ry
from pydantic import Field, field_validator
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
from atomforge.engines.espresso_output import (
    OUTPUT_FILE,
    band_gap,
    bfgs_steps,
    last_float,
    last_printed_geometry,
    last_run,
    output_problem,
    pw_version,
    read_last,
    site_moments,
)
from atomforge.engines.mpi import MpiProfile
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.status import JobStatus

INPUT_FILE = "espresso.pwi"
DEFAULT_KSPACING = 0.1
"""k-point spacing (1/Å, ASE's convention without 2π) when neither kpts nor kspacing is set."""
RESCALE_MAGMOM = 10.0
"""pw.x 6.7's starting_magnetization is a fraction in [-1, 1]: μB are divided by this."""
DEFAULT_PSEUDOPOTENTIALS = {
    "Al": "Al.pz-vbc.UPF",
    "As": "As.pz-bhs.UPF",
    "Au": "Au.pz-rrkjus_aewfc.UPF",
    "B": "B.pz-vbc.UPF",
    "C": "C.pz-rrkjus.UPF",
    "Cu": "Cu.pz-d-rrkjus.UPF",
    "Fe": "Fe.pz-nd-rrkjus.UPF",
    "H": "H.pz-vbc.UPF",
    "Mg": "Mg.pz-n-vbc.UPF",
    "Ni": "Ni.pz-nd-rrkjus.UPF",
    "O": "O.pz-rrkjus.UPF",
    "Pb": "Pb.pz-d-van.UPF",
    "Pt": "Pt.rel-pz-n-rrkjus.UPF",
    "Si": "Si.pz-vbc.UPF",
    "Ti": "Ti.pz-sp-van_ak.UPF",
}
"""One LDA (pz) pseudopotential per element, all in /usr/share/espresso/pseudo."""
FUNCTIONALS = ("pz", "pbesol", "pbe", "blyp", "tpss")
SMEARINGS = Literal["gaussian", "mp", "mv", "cold", "fd", "m-p", "m-v", "f-d"]


class EspressoOptions(EngineOptions):
    """Options of pw.x (energies in Ry, as pw.x takes them)."""

    ecutwfc: float = Field(30.0, gt=0, description="Wavefunction cutoff (Ry).")
    ecutrho: float | None = Field(
        None,
        gt=0,
        description="Density cutoff (Ry); pw.x's default is four times ecutwfc "
        "(ultrasoft and PAW pseudopotentials want 8 to 12 times ecutwfc).",
    )
    kpts: tuple[int, int, int] | None = Field(
        None, description="Monkhorst-Pack grid, '4,4,4' or [4, 4, 4]; default: from kspacing."
    )
    kspacing: float | None = Field(
        None,
        gt=0,
        description="Largest k-point spacing (1/Å, without 2π) when kpts is "
        f"not given; default {DEFAULT_KSPACING}.",
    )
    pseudopotentials: dict[str, str] = Field(
        default_factory=dict,
        description="File per element, 'Si=Si.pz-vbc.UPF,O=O.pz-rrkjus.UPF' or a dict; "
        "other elements get the default LDA file of the pseudopotential folder.",
    )
    smearing: SMEARINGS | None = Field(
        None, description="Occupation smearing (metals); default: fixed occupations."
    )
    degauss: float | None = Field(
        None, gt=0, description="Smearing width (Ry); 0.01 if only smearing is given."
    )
    spin: bool = Field(
        False,
        description="Collinear spin (nspin=2) starting from the structure's initial "
        "magnetic moments (1 μB per atom where it has none).",
    )
    conv_thr: float = Field(1e-6, gt=0, description="SCF convergence threshold (Ry).")
    mixing_beta: float = Field(0.7, gt=0, le=1, description="SCF charge mixing factor.")
    electron_maxstep: int = Field(100, ge=1, description="Most SCF iterations.")
    input: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Any other pw.x namelist values, e.g. {'system': {'nbnd': 8}} "
        "(input.system.nbnd=8 on the command line); they override the above.",
    )

    @field_validator("kpts", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        """Return '4,4,4' or '4 4 4' as a list of three numbers."""
        if value is None:
            return value
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        try:
            grid = [int(k) for k in value]
        except (TypeError, ValueError):
            grid = []
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError("kpts needs three positive integers, e.g. 4,4,4")
        return grid

    @field_validator("pseudopotentials", mode="before")
    @classmethod
    def _pseudo_map(cls, value: Any) -> Any:
        """Return 'Si=Si.pz-vbc.UPF,O=...' as a dict."""
        if not isinstance(value, str):
            return value
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("pseudopotentials reads 'Si=Si.pz-vbc.UPF,O=O.pz-rrkjus.UPF'")
        return {element.strip(): name.strip() for element, name in pairs}


class EspressoProfile(BaseSettings):
    """How to run pw.x: ``ATOMFORGE_ESPRESSO_COMMAND`` and ``ATOMFORGE_ESPRESSO_PSEUDO_DIR``."""

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_ESPRESSO_")

    command: str = Field("pw.x", description="The pw.x executable.")
    pseudo_dir: Path = Field(
        Path("/usr/share/espresso/pseudo"), description="Folder of the pseudopotential files."
    )


class SmallerMixing(Handler):
    """The SCF did not converge: mix more gently and allow more iterations."""

    fixes = "scf_not_converged"

    def correct(self, engine, directory, params, problem) -> Correction:
        """Return mixing_beta halved and electron_maxstep doubled."""
        opts: EspressoOptions = params.options
        beta, steps = opts.mixing_beta / 2, opts.electron_maxstep * 2
        return Correction(
            f"mixing_beta {beta:g}, electron_maxstep {steps}",
            options={"mixing_beta": beta, "electron_maxstep": steps},
        )


def _functional(filename: str) -> str | None:
    """Return the functional family a pseudopotential file name says (``pz``, ``pbe``)."""
    tags = filename.partition(".")[2].lower().removeprefix("rel-")
    return next((f for f in FUNCTIONALS if re.match(rf"{f}\b", tags)), None)


class EspressoEngine(Engine):
    """Quantum ESPRESSO pw.x, one (MPI) process per structure."""

    name = "espresso"
    outputs = frozenset({"gap_eV", "fermi_level_eV", "pressure_GPa", "magnetic_moment"})
    max_atoms = 2000
    description = "Quantum ESPRESSO pw.x (plane-wave DFT, LDA pseudopotentials default); periodic"
    requires = "pw.x and pseudopotentials (Debian quantum-espresso, quantum-espresso-data)"
    options_model = EspressoOptions
    supports_molecules = False
    supports_charge = False
    supports_cell_relaxation = True
    handlers = (SmallerMixing(), ContinueOptimization())
    log_name = OUTPUT_FILE

    def __init__(self, profile: EspressoProfile | None = None) -> None:
        self.profile = profile or EspressoProfile()

    def check_installed(self, params: CalculationParameters) -> None:
        """Raise InputError if pw.x or the pseudopotential folder is missing."""
        if shutil.which(self.profile.command) is None:
            raise InputError(
                f"espresso: pw.x command {self.profile.command!r} not found "
                "(install quantum-espresso or set ATOMFORGE_ESPRESSO_COMMAND)"
            )
        if not self.profile.pseudo_dir.is_dir():
            raise InputError(
                f"espresso: no pseudopotential folder {self.profile.pseudo_dir} "
                "(install quantum-espresso-data or set ATOMFORGE_ESPRESSO_PSEUDO_DIR)"
            )

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError for a missing cell, pseudopotential or mixed functionals."""
        super().check(atoms, params)
        if atoms.cell.rank < 3:
            raise InputError("espresso: needs a full 3D cell (add vacuum along open axes)")
        files = self.pseudopotentials(atoms, params.options)
        families = {_functional(name) for name in files.values()} - {None}
        system = {key.lower() for key in self.input_data(params).get("system", {})}
        if len(families) > 1 and "input_dft" not in system:
            raise InputError(
                f"espresso: pseudopotentials mix functionals ({', '.join(files.values())}): "
                "choose one family in pseudopotentials or set input.system.input_dft"
            )

    def pseudopotentials(self, atoms: Atoms, options: EspressoOptions) -> dict[str, str]:
        """Return the pseudopotential file of each element of ``atoms``; InputError if none."""
        folder = self.profile.pseudo_dir
        files = {}
        for element in sorted(set(atoms.get_chemical_symbols())):
            name = options.pseudopotentials.get(element) or DEFAULT_PSEUDOPOTENTIALS.get(element)
            if name is None:
                name = next((p.name for p in sorted(folder.glob(f"{element}.*"))), None)
            if name is None or not (folder / name).is_file():
                raise InputError(
                    f"espresso: no pseudopotential {name or 'file'} for {element} in {folder}: "
                    f"set pseudopotentials={element}=FILE or ATOMFORGE_ESPRESSO_PSEUDO_DIR"
                )
            files[element] = name
        return files

    def input_data(self, params: CalculationParameters) -> dict[str, dict[str, Any]]:
        """Return the pw.x namelists for ``params`` (options.input merged over them)."""
        opts: EspressoOptions = params.options
        calculation = {CalculationKind.singlepoint: "scf", CalculationKind.optimize: "relax"}
        control = {
            "calculation": "vc-relax" if params.relax_cell else calculation[params.kind],
            "pseudo_dir": str(self.profile.pseudo_dir),
            "outdir": ".",
            "tprnfor": params.forces or params.kind is CalculationKind.optimize,
            "tstress": True,
            "forc_conv_thr": params.fmax / (Ry / Bohr),
            "nstep": params.max_steps,
        }
        system: dict[str, Any] = {"ecutwfc": opts.ecutwfc, "ecutrho": opts.ecutrho}
        if opts.smearing or opts.degauss:
            system |= {"occupations": "smearing", "smearing": opts.smearing or "mv"}
            system["degauss"] = opts.degauss or 0.01
        if opts.spin:
            system["nspin"] = 2
        electrons = {
            "conv_thr": opts.conv_thr,
            "mixing_beta": opts.mixing_beta,
            "electron_maxstep": opts.electron_maxstep,
        }
        data = {"control": control, "system": system, "electrons": electrons}
        for section, values in opts.input.items():
            data[section.lower()] = data.get(section.lower(), {}) | values
        return {s: {k: v for k, v in d.items() if v is not None} for s, d in data.items()}

    def write_inputs(self, atoms: Atoms, params: CalculationParameters, directory: Path) -> None:
        """Write ``espresso.pwi`` for pw.x into ``directory``."""
        opts: EspressoOptions = params.options
        atoms = atoms.copy()
        moments = atoms.get_initial_magnetic_moments()
        if opts.spin and not moments.any():
            moments = np.ones(len(atoms))
        atoms.set_initial_magnetic_moments(moments if opts.spin else None)
        kspacing = None if opts.kpts else opts.kspacing or DEFAULT_KSPACING
        write(
            directory / INPUT_FILE,
            atoms,
            format="espresso-in",
            input_data=self.input_data(params),
            pseudopotentials=self.pseudopotentials(atoms, opts),
            kpts=opts.kpts,
            kspacing=kspacing,
            rescale_magmom_fac=RESCALE_MAGMOM,
        )

    def command(self, params: CalculationParameters, directories: list[Path]) -> Command:
        """Return pw.x reading ``espresso.pwi``, under mpirun when ``cores`` > 1."""
        mpi = MpiProfile()
        return Command(mpi.argv([self.profile.command, "-in", INPUT_FILE], params.cores), mpi.env())

    def diagnose(
        self, directory: Path, params: CalculationParameters, status: JobStatus
    ) -> Problem | None:
        """Return a pw.x error, an unconverged SCF, or an optimization out of steps."""
        path = directory / OUTPUT_FILE
        run = last_run(path.read_text(errors="replace")) if path.exists() else ""
        return output_problem(run, params.max_steps)

    def last_geometry(self, directory: Path, params: CalculationParameters) -> Atoms | None:
        """Return the last geometry (and cell) an optimization reached, or None.

        That is the one BFGS printed last, computed or not: a restart goes on from there.
        """
        return last_printed_geometry(directory / OUTPUT_FILE)

    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return energy, forces, stress, moments, Fermi level, gap and final structure.

        Raises ValueError for an output whose last SCF did not converge.
        """
        atoms, run = read_last(directory / OUTPUT_FILE)
        calc = atoms.calc
        results = calc.results
        optimizing = params.kind is CalculationKind.optimize
        atoms.calc = None
        return EngineResults(
            energy=float(results["energy"]),
            atoms=atoms,
            forces=results.get("forces"),
            stress=results.get("stress"),
            magmoms=site_moments(run, len(atoms)),
            magmom=last_float(r"total magnetization\s*=\s*(\S+)", run),
            fermi_level=calc.get_fermi_level(),
            gap=band_gap(run),
            converged="bfgs converged" in run if optimizing else None,
            n_steps=bfgs_steps(run) if optimizing else None,
            properties={
                "pseudopotentials": self.pseudopotentials(atoms, params.options),
                "scf_accuracy_Ry": last_float(r"estimated scf accuracy\s*<\s*(\S+) Ry", run),
            },
        )

    def version(self) -> str:
        """Return the pw.x version, e.g. ``6.7MaX``."""
        return pw_version(self.profile.command)
