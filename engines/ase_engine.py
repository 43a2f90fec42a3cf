"""Engines that are ASE calculators running inside Python (EMT, tblite).

They still run in a separate process (``python -m atomforge.engines.ase_runner``) so that a timeout
or a cancellation can kill them; one process computes a whole chunk of structures, so the
interpreter start-up is paid per chunk, not per structure.
"""

from __future__ import annotations

import json
import sys
from abc import abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.io import read, write
from atomforge.engines.base import Engine, EngineResults, JobStatus, OutputSink, raise_for_crashes
from atomforge.engines.errors import EngineError, RunStopped
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.process import LineSplitter, run_process
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

INPUT_FILE = "input.extxyz"
JOB_FILE = "job.json"
FINAL_FILE = "final.extxyz"
RESULTS_FILE = "results.json"
DONE_MARKER = "atomforge-job-done "
RUNNER_START_SECONDS = 60.0


class AseRunnerProfile(BaseSettings):
    """How to launch the runner: ``ATOMFORGE_ASE_OMP_THREADS`` OpenMP threads each.

    One runner runs per Dask worker thread, so one OpenMP thread each is the default: a
    runner per core with every runner using every core slows a screen ten times over.
    """

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_ASE_")

    omp_threads: int = Field(1, ge=1, description="OpenMP threads per runner process.")

    def env(self) -> dict[str, str]:
        """Return the environment variables a runner process needs."""
        return {"OMP_NUM_THREADS": str(self.omp_threads), "OMP_MAX_ACTIVE_LEVELS": "1"}


class AseEngine(Engine):
    """An engine whose work is an ASE calculator plus an ASE optimizer."""

    @abstractmethod
    def make_calculator(self, params: CalculationParameters) -> Calculator:
        """Return a fresh ASE calculator set up for ``params``."""

    def extra_properties(self, calc: Calculator) -> dict[str, Any]:
        """Return engine-specific results (e.g. the HOMO-LUMO gap) after a calculation."""
        return {}

    def write_inputs(self, atoms: Atoms, params: CalculationParameters, directory: Path) -> None:
        """Write ``input.extxyz`` and ``job.json`` (engine name and parameters)."""
        write(directory / INPUT_FILE, atoms, format="extxyz")
        fields = set(CalculationParameters.model_fields)
        job = {"engine": self.name, "parameters": params.model_dump(mode="json", include=fields)}
        (directory / JOB_FILE).write_text(json.dumps(job))

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
        """Run every directory not yet completed in one runner process."""
        pending = [d for d in directories if not _completed(d)]
        if not pending:
            return
        if stop_file.exists():
            raise RunStopped(f"{self.name}: run was stopped")

        def on_line(line: str) -> None:
            if line.startswith(DONE_MARKER):
                done = Path(line[len(DONE_MARKER) :])
                on_done(done, JobStatus.read(done) or JobStatus("failed", "no status written"))
            else:
                log(line + "\n")

        lines = LineSplitter(on_line)

        argv = [sys.executable, "-u", "-m", "atomforge.engines.ase_runner", *map(str, pending)]
        try:
            outcome = run_process(
                argv,
                cwd=pending[0].parent,
                timeout=RUNNER_START_SECONDS + params.timeout_seconds * len(pending),
                pid_dir=pid_dir,
                stop_file=stop_file,
                log=lines,
                log_name=f"{pending[0].name}.runner.log",
                env=AseRunnerProfile().env(),
            )
        except OSError as exc:
            raise EngineError(f"{self.name}: cannot start runner: {exc}", retryable=True) from None
        lines.close()
        statuses = [JobStatus.read(d) for d in pending]
        for i, (directory, status) in enumerate(zip(pending, statuses)):
            if status is None:
                statuses[i] = _unfinished_status(outcome)
                statuses[i].write(directory)
                on_done(directory, statuses[i])
        raise_for_crashes(statuses, self.name)

    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return the results the runner stored in ``final.extxyz`` and ``results.json``."""
        atoms = read(directory / FINAL_FILE, format="extxyz")
        summary = json.loads((directory / RESULTS_FILE).read_text())
        forces = atoms.get_forces() if params.forces else None
        return EngineResults(
            energy=summary["energy"],
            energy_hartree=summary.get("energy_hartree"),
            atoms=atoms,
            forces=forces,
            gap=summary.get("gap"),
            converged=summary.get("converged"),
            n_steps=summary.get("n_steps"),
            properties=summary.get("properties", {}),
        )


def _completed(directory: Path) -> bool:
    """Return True when ``directory`` already holds a completed job."""
    status = JobStatus.read(directory)
    return status is not None and status.completed


def _unfinished_status(outcome) -> JobStatus:
    """Return the status of a job the runner never finished, from how the runner ended."""
    if outcome.stopped:
        return JobStatus("stopped", "run was stopped", outcome.wall_seconds, outcome.returncode)
    if outcome.timed_out:
        return JobStatus("timeout", "runner exceeded its time limit", outcome.wall_seconds)
    if outcome.returncode < 0:
        return JobStatus(
            "crashed", f"runner killed by signal {-outcome.returncode}", outcome.wall_seconds
        )
    return JobStatus(
        "failed", f"runner exited with code {outcome.returncode}", outcome.wall_seconds
    )
