"""Engines that are ASE calculators running inside Python (EMT, tblite).

They still run in a separate process (``python -m atomforge.engines.ase_runner``) so that
a timeout or a cancellation can kill them; one process computes a whole chunk of
structures (a batch engine), so the interpreter start-up is paid per chunk.
"""

from __future__ import annotations

import json
import sys
from abc import abstractmethod
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.io import read, write

from atomforge.engines.base import (
    Command,
    ContinueOptimization,
    Engine,
    EngineResults,
    Problem,
)
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.status import JobStatus

INPUT_FILE = "input.extxyz"
JOB_FILE = "job.json"
FINAL_FILE = "final.extxyz"
RESULTS_FILE = "results.json"


class AseEngine(Engine):
    """An engine whose work is an ASE calculator plus an ASE optimizer, in a runner process."""

    batch = True
    supports_cell_relaxation = True
    handlers = (ContinueOptimization(),)

    @abstractmethod
    def make_calculator(self, params: CalculationParameters) -> Calculator:
        """Return a fresh ASE calculator set up for ``params``."""

    def extra_properties(self, calc: Calculator) -> dict[str, Any]:
        """Return engine-specific results (e.g. the HOMO-LUMO gap) after a calculation."""
        return {}

    def write_inputs(self, atoms: Atoms, params: CalculationParameters, directory: Path) -> None:
        """Write ``input.extxyz`` and ``job.json`` (the parameters, options included)."""
        write(directory / INPUT_FILE, atoms, format="extxyz")
        (directory / JOB_FILE).write_text(
            json.dumps({"parameters": params.model_dump(mode="json")})
        )

    def command(self, params: CalculationParameters, directories: list[Path]) -> Command:
        """Return the runner command for ``directories``, with ``cores`` OpenMP threads."""
        argv = [sys.executable, "-u", "-m", "atomforge.engines.ase_runner", *map(str, directories)]
        return Command(argv, {"OMP_NUM_THREADS": str(params.cores), "OMP_MAX_ACTIVE_LEVELS": "1"})

    def diagnose(
        self, directory: Path, params: CalculationParameters, status: JobStatus
    ) -> Problem | None:
        """Return an optimization that ran out of steps as a problem."""
        if not status.completed or params.kind is not CalculationKind.optimize:
            return None
        summary = json.loads((directory / RESULTS_FILE).read_text())
        if summary.get("converged") is False:
            return Problem(
                "optimization_not_converged",
                f"{self.name}: optimization not converged in {params.max_steps} steps",
            )
        return None

    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return the results the runner stored in ``final.extxyz`` and ``results.json``."""
        atoms = read(directory / FINAL_FILE, format="extxyz")
        summary = json.loads((directory / RESULTS_FILE).read_text())
        calc = atoms.calc.results if atoms.calc is not None else {}
        return EngineResults(
            energy=summary["energy"],
            atoms=atoms,
            forces=calc.get("forces") if params.forces else None,
            stress=calc.get("stress"),
            magmoms=calc.get("magmoms"),
            gap=summary.get("gap"),
            converged=summary.get("converged"),
            n_steps=summary.get("n_steps"),
            properties=summary.get("properties", {}),
        )
