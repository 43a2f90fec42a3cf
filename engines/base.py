"""The engine adapter contract: one method for each of the four flow steps.

An engine follows ASE's file-IO calculators: ``write_inputs`` (template), ``execute``
(profile: how to launch the program) and ``read_results`` (template). ``check`` holds the
engine's own input rules, run before anything is written.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from atomforge.engines.errors import EngineError, InputError, RunStopped
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.process import ProcessOutcome

STATUS_FILE = "status.json"
OutputSink = Callable[[str], None]
"""Takes engine output text as it arrives: blocks of any size, not necessarily whole lines."""


@dataclass
class EngineResults:
    """What an engine computed for one structure (ASE units: eV, A)."""

    energy: float
    atoms: Atoms
    forces: np.ndarray | None = None
    energy_hartree: float | None = None
    gap: float | None = None
    converged: bool | None = None
    n_steps: int | None = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobStatus:
    """How running one structure ended, as written to ``status.json`` in its directory."""

    status: str
    message: str = ""
    wall_seconds: float = 0.0
    returncode: int | None = None

    @property
    def completed(self) -> bool:
        """Return True when the engine finished this structure normally."""
        return self.status == "completed"

    def write(self, directory: Path) -> None:
        """Write this status into ``directory`` atomically."""
        tmp = directory / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(directory / STATUS_FILE)

    @classmethod
    def read(cls, directory: Path) -> JobStatus | None:
        """Return the status stored in ``directory``, or None if the job never ended."""
        path = directory / STATUS_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


class Engine(ABC):
    """An adapter that turns ASE ``Atoms`` plus parameters into results."""

    name: ClassVar[str]
    description: ClassVar[str]
    supports_periodic: ClassVar[bool] = True
    supports_molecules: ClassVar[bool] = True
    supports_charge: ClassVar[bool] = True
    supports_cell_relaxation: ClassVar[bool] = False
    known_options: ClassVar[frozenset[str]] = frozenset()
    runs_one_at_a_time: ClassVar[bool] = False
    """True if :meth:`execute` takes each directory only when it is about to run it, so a
    run may hand it a lazy sequence that grows by taking over other tasks' structures."""

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise :class:`InputError` if this engine cannot compute ``atoms`` with ``params``."""
        unknown = sorted(set(params.options) - self.known_options)
        if unknown:
            known = ", ".join(sorted(self.known_options)) or "none"
            raise InputError(
                f"engine {self.name!r} does not know option(s) {', '.join(unknown)}"
                f" (known: {known})"
            )
        periodic = bool(atoms.pbc.any())
        if periodic and not self.supports_periodic:
            raise InputError(f"engine {self.name!r} cannot compute periodic structures")
        if not periodic and not self.supports_molecules:
            raise InputError(f"engine {self.name!r} needs a periodic cell")
        if not self.supports_charge and (params.charge != 0 or params.multiplicity != 1):
            raise InputError(
                f"engine {self.name!r} has no charge or spin: use charge 0, multiplicity 1"
            )
        if params.relax_cell and not self.supports_cell_relaxation:
            raise InputError(f"engine {self.name!r} cannot relax the cell")
        if params.relax_cell and (not periodic or params.kind is not CalculationKind.optimize):
            raise InputError("relax_cell needs a periodic structure and kind 'optimize'")

    @abstractmethod
    def write_inputs(self, atoms: Atoms, params: CalculationParameters, directory: Path) -> None:
        """Write everything the engine needs to compute ``atoms`` into ``directory``."""

    @abstractmethod
    def execute(
        self,
        directories: Iterable[Path],
        params: CalculationParameters,
        *,
        pid_dir: Path,
        stop_file: Path,
        log: OutputSink,
        on_done: Callable[[Path, JobStatus], None],
    ) -> None:
        """Run the engine in each prepared directory, in order, writing a :class:`JobStatus`.

        Engine processes record themselves in ``pid_dir`` and stop when ``stop_file`` appears.
        Their output goes to ``log`` as it arrives; ``on_done`` is called after each
        directory finishes.
        """

    @abstractmethod
    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return the results the engine left in ``directory``."""

    @abstractmethod
    def version(self) -> str:
        """Return the engine's version string."""


OUTSIDE_KILL_SIGNALS = frozenset({-9, -15, -1})


def status_from_exit(outcome: ProcessOutcome, log_path: Path) -> JobStatus:
    """Return the :class:`JobStatus` of a finished engine process.

    A process killed from outside (SIGKILL, SIGTERM, SIGHUP: the OOM killer, a preempted
    node) ends as ``crashed``, the one status worth retrying.
    """
    code = outcome.returncode
    if outcome.stopped:
        return JobStatus("stopped", "run was stopped", outcome.wall_seconds, code)
    if outcome.timed_out:
        return JobStatus("timeout", "engine exceeded its time limit", outcome.wall_seconds, code)
    if code == 0:
        return JobStatus("completed", "", outcome.wall_seconds, code)
    if code in OUTSIDE_KILL_SIGNALS:
        return JobStatus("crashed", f"engine killed by signal {-code}", outcome.wall_seconds, code)
    return JobStatus("failed", error_summary(log_path, code), outcome.wall_seconds, code)


def error_summary(log_path: Path, returncode: int) -> str:
    """Return one line describing why an engine failed, taken from its log."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    errors = [
        line.strip(" #-*")
        for line in lines
        if "error" in line.lower() or "not converge" in line.lower()
    ]
    detail = "; ".join(dict.fromkeys(e for e in errors[-3:] if e))
    reason = f"exit code {returncode}" if returncode > 0 else f"signal {-returncode}"
    return f"engine failed ({reason}){': ' + detail if detail else ''}"


def raise_for_crashes(statuses: Sequence[JobStatus | None], engine: str) -> None:
    """Raise the right error for statuses that end the whole step.

    A stopped run raises :class:`RunStopped`; processes killed from outside raise a
    retryable :class:`EngineError` (completed jobs are kept and skipped on the retry).
    """
    if any(s is not None and s.status == "stopped" for s in statuses):
        raise RunStopped(f"{engine}: run was stopped")
    crashed = [s for s in statuses if s is not None and s.status == "crashed"]
    if crashed:
        raise EngineError(f"{engine}: {crashed[0].message}", retryable=True)
