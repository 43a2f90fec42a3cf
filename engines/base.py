"""The engine contract: what an engine writes, how it is launched, and how its output is read.

An engine is a template in the sense of ASE's file-IO calculators: :meth:`Engine.write_inputs`
writes a working directory, :meth:`Engine.command` says how to launch the program there,
:meth:`Engine.read_results` reads what it left, and :meth:`Engine.diagnose` classifies a
failure so that one of the engine's :class:`Handler` objects can correct it. One loop runs
them all (:mod:`atomforge.engines.runloop`): no engine writes its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from pydantic import BaseModel, ConfigDict

from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.status import JobStatus

STRUCTURE_FILE = "structure.extxyz"
"""The input structure of a job, written into its directory before the engine's own inputs."""
DONE_MARKER = "atomforge-job-done "
"""A batch runner prints this plus a directory when it has written that directory's status."""


class EngineOptions(BaseModel):
    """Options of one engine (the Prefect UI renders each engine's own subclass)."""

    model_config = ConfigDict(extra="forbid")


@cache
def installed_version(distribution: str) -> str | None:
    """Return the installed version of the Python ``distribution``, or None if it is not
    installed: read once per process (the metadata scan costs about 3 ms, and every
    result names its engine's version)."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


@dataclass
class Command:
    """How to launch an engine: the program and its arguments, and extra environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineResults:
    """What an engine computed for one structure, in ASE units (eV, Å, eV/Å³)."""

    energy: float
    atoms: Atoms
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    magmoms: np.ndarray | None = None
    magmom: float | None = None
    fermi_level: float | None = None
    gap: float | None = None
    converged: bool | None = None
    n_steps: int | None = None
    version: str | None = None
    """The program version the output names, where it names one (overrides ``version()``)."""
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    """A failure an engine recognised in its output: a code handlers match, and one line."""

    code: str
    message: str


@dataclass
class Correction:
    """What a handler changes before the engine runs again.

    ``options`` are replaced in the job's engine options; ``atoms``, when given, is the
    new starting structure (for example the last geometry of an optimization).
    """

    action: str
    options: dict[str, Any] = field(default_factory=dict)
    atoms: Atoms | None = None


class Handler(ABC):
    """Fixes one kind of :class:`Problem` (custodian's check/correct, AiiDA's handlers)."""

    fixes: ClassVar[str]
    """The :attr:`Problem.code` this handler corrects."""

    @abstractmethod
    def correct(
        self, engine: Engine, directory: Path, params: CalculationParameters, problem: Problem
    ) -> Correction | None:
        """Return the change to make before the next attempt, or None if there is none."""


class ContinueOptimization(Handler):
    """An optimization ran out of steps: continue from its last geometry."""

    fixes = "optimization_not_converged"

    def correct(
        self, engine: Engine, directory: Path, params: CalculationParameters, problem: Problem
    ) -> Correction | None:
        """Return a restart from the last geometry the engine wrote."""
        atoms = engine.last_geometry(directory, params)
        if atoms is None:
            return None
        return Correction("continue from the last geometry", atoms=atoms)


class Engine(ABC):
    """An adapter that turns ASE ``Atoms`` plus parameters into results."""

    name: ClassVar[str]
    description: ClassVar[str]
    requires: ClassVar[str] = ""
    """What must be installed for this engine, in words (``atomforge engines`` shows it)."""
    options_model: ClassVar[type[EngineOptions]] = EngineOptions
    kinds: ClassVar[frozenset[CalculationKind]] = frozenset(
        {CalculationKind.singlepoint, CalculationKind.optimize}
    )
    supports_periodic: ClassVar[bool] = True
    supports_molecules: ClassVar[bool] = True
    supports_charge: ClassVar[bool] = True
    supports_cell_relaxation: ClassVar[bool] = False
    handlers: ClassVar[tuple[Handler, ...]] = ()
    batch: ClassVar[bool] = False
    """True if one process computes a whole chunk: :meth:`command` then gets every
    directory and prints :data:`DONE_MARKER` lines; otherwise one process per directory,
    each taken just before it runs (so a task may take over other chunks' structures)."""
    log_name: ClassVar[str] = "engine.log"
    max_atoms: ClassVar[int | None] = None
    """The most atoms this engine is given: larger structures are refused at validation
    (None: no limit)."""
    outputs: ClassVar[frozenset[str]] = frozenset()
    """Result fields this engine can fill beyond energies, forces and convergence
    (``gap_eV``, ``fermi_level_eV``, ``pressure_GPa``, ``magnetic_moment``): a workflow's
    ``select`` may only filter on what the step before it produces."""

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise :class:`InputError` if this engine cannot compute ``atoms`` with ``params``."""
        periodic = bool(atoms.pbc.any())
        if params.kind not in self.kinds:
            known = ", ".join(sorted(kind.value for kind in self.kinds))
            raise InputError(f"{self.name}: no kind {params.kind.value!r} (has: {known})")
        if periodic and not self.supports_periodic:
            raise InputError(f"{self.name}: cannot compute periodic structures")
        if not periodic and not self.supports_molecules:
            raise InputError(f"{self.name}: needs a periodic cell (this structure has none)")
        if not self.supports_charge and (params.charge != 0 or params.multiplicity != 1):
            raise InputError(f"{self.name}: has no charge or spin: use charge 0, multiplicity 1")
        if params.relax_cell and not self.supports_cell_relaxation:
            raise InputError(f"{self.name}: cannot relax the cell")
        if params.relax_cell and (not periodic or params.kind is not CalculationKind.optimize):
            raise InputError("relax_cell needs a periodic structure and kind 'optimize'")
        if self.max_atoms is not None and len(atoms) > self.max_atoms:
            raise InputError(
                f"{self.name}: {len(atoms)} atoms is more than it takes ({self.max_atoms})"
            )

    def check_installed(self, params: CalculationParameters) -> None:
        """Raise :class:`InputError` naming what is missing to run this engine here.

        The default finds nothing missing: engines with a program or resource files to
        look for say so.
        """
        return None

    @abstractmethod
    def write_inputs(self, atoms: Atoms, params: CalculationParameters, directory: Path) -> None:
        """Write everything the engine needs to compute ``atoms`` into ``directory``."""

    @abstractmethod
    def command(self, params: CalculationParameters, directories: list[Path]) -> Command:
        """Return how to launch the engine on ``directories`` (one unless :attr:`batch`)."""

    @abstractmethod
    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return the results the engine left in ``directory``."""

    def diagnose(
        self, directory: Path, params: CalculationParameters, status: JobStatus
    ) -> Problem | None:
        """Return the problem in a finished job's output, or None if there is none.

        Called for jobs whose process ended by itself, completed or failed: an engine that
        exits 0 with an unusable result is caught here.
        """
        return None

    def last_geometry(self, directory: Path, params: CalculationParameters) -> Atoms | None:
        """Return the last geometry an optimization reached, or None."""
        return self.read_results(directory, params).atoms

    @abstractmethod
    def version(self) -> str:
        """Return the engine's version string."""
