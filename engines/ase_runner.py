"""Run ASE-calculator jobs prepared by :class:`atomforge.engines.ase_engine.AseEngine`.

Usage: ``python -m atomforge.engines.ase_runner DIR [DIR ...]``. Each directory gets a
``runner-status.json`` (the run loop diagnoses it and writes ``status.json``); results
go to ``final.extxyz`` and ``results.json``, and an
optimization's path, one frame a step with energy and forces, to ``opt.extxyz`` as it
goes (an MD run's frames to ``trajectory.extxyz``, see :mod:`.ase_md`). A job past its
``timeout_seconds`` is interrupted and marked ``timeout``; the next job still runs.

An engine that is a :class:`BatchPredictor` (a model that evaluates many structures in
one call) computes the singlepoint jobs of up to :data:`PREDICT_AHEAD` directories in one
call before they are finished one by one; if that call fails, each job is computed by
itself.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.optimize import BFGS

from atomforge.engines.ase_engine import FINAL_FILE, INPUT_FILE, JOB_FILE, RESULTS_FILE
from atomforge.engines.ase_md import MD_TRAJECTORY, run_md
from atomforge.engines.base import DONE_MARKER
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.registry import get_engine, parse_parameters
from atomforge.engines.status import RUNNER_STATUS_FILE, JobStatus, Status

TRAJECTORY_FILE = "opt.extxyz"
TRAJECTORY_PROPERTIES = ("energy", "free_energy", "forces", "stress")
PREDICT_AHEAD = 16
"""Directories whose singlepoints a :class:`BatchPredictor` computes in one call."""
Predicted = dict[str, Any]
"""Calculator results of one structure (energy, forces, ...), as a calculator stores them."""


@runtime_checkable
class BatchPredictor(Protocol):
    """An engine that computes the singlepoints of many structures in one call."""

    def predict(self, structures: list[Atoms], params: CalculationParameters) -> list[Predicted]:
        """Return the calculator results of each structure, in order."""


class JobTimeout(Exception):
    """Raised inside a job when its time limit passes."""


def _on_alarm(signum: int, frame: object) -> None:
    raise JobTimeout


def _frame_writer(atoms: Atoms, trajectory: TextIO) -> Callable[[], None]:
    """Return an optimizer observer that appends each step to ``trajectory`` as extxyz.

    It takes the properties the calculator has just computed from its results: ASE's
    ``Trajectory`` asks the calculator for each again, which on small molecules costs
    more than a tblite step.
    """

    def write_frame() -> None:
        frame = atoms.copy()
        results = atoms.calc.results
        frame.calc = SinglePointCalculator(
            frame, **{key: results[key] for key in TRAJECTORY_PROPERTIES if key in results}
        )
        write(trajectory, frame, format="extxyz")
        trajectory.flush()

    return write_frame


def _job(directory: Path) -> tuple[CalculationParameters, Atoms]:
    """Return the parameters and the input structure of the job in ``directory``."""
    job = json.loads((directory / JOB_FILE).read_text())
    return parse_parameters(job["parameters"]), read(directory / INPUT_FILE, format="extxyz")


def compute(directory: Path, predicted: Predicted | None = None) -> dict:
    """Run the job in ``directory`` and return its results summary.

    ``predicted`` holds the results of a singlepoint already computed in a batch.
    """
    params, atoms = _job(directory)
    engine = get_engine(params.engine)
    if predicted is not None:
        atoms.calc = SinglePointCalculator(atoms, **predicted)
    else:
        atoms.calc = engine.make_calculator(params)
    converged = None
    n_steps = None
    thermo = None
    if params.kind is CalculationKind.md:
        with (directory / MD_TRAJECTORY).open("w") as trajectory:
            thermo = run_md(atoms, params.options, _frame_writer(atoms, trajectory))
        n_steps = params.options.steps
    if params.kind is CalculationKind.optimize:
        target = FrechetCellFilter(atoms) if params.relax_cell else atoms
        with (directory / TRAJECTORY_FILE).open("w") as trajectory:
            optimizer = BFGS(target, logfile="-")
            optimizer.attach(_frame_writer(atoms, trajectory))
            converged = bool(optimizer.run(fmax=params.fmax, steps=params.max_steps))
        n_steps = optimizer.nsteps
    energy = atoms.get_potential_energy()
    if params.forces:
        atoms.get_forces()
    if atoms.pbc.all() and "stress" in atoms.calc.implemented_properties:
        atoms.get_stress()
    extras = {} if predicted is not None else engine.extra_properties(atoms.calc)
    if thermo is not None:
        extras["thermo"] = thermo
    write(directory / FINAL_FILE, atoms, format="extxyz")
    return {
        "energy": float(energy),
        "converged": converged,
        "n_steps": n_steps,
        "gap": extras.pop("gap", None),
        "properties": extras,
    }


def run_job(directory: Path, predicted: Predicted | None = None) -> JobStatus:
    """Compute one directory under its time limit and return the status written there."""
    params = json.loads((directory / JOB_FILE).read_text())["parameters"]
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, float(params["timeout_seconds"]))
    try:
        summary = compute(directory, predicted)
        status = JobStatus(Status.completed, "", time.monotonic() - started, 0)
        (directory / RESULTS_FILE).write_text(json.dumps(summary))
    except JobTimeout:
        status = JobStatus(
            Status.timeout, "engine exceeded its time limit", time.monotonic() - started
        )
    except Exception as exc:
        traceback.print_exc(file=sys.stdout)
        message = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        )
        status = JobStatus(Status.failed, message, time.monotonic() - started, 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    status.write(directory, RUNNER_STATUS_FILE)
    return status


def predict_singlepoints(directories: list[Path]) -> dict[Path, Predicted]:
    """Return the batch-computed results of the singlepoint jobs among ``directories``.

    Only jobs of a :class:`BatchPredictor` engine with the same parameters as the first
    such job are computed, all in one call under the sum of their time limits; if that
    call fails (or there is nothing to batch), none is returned and each job is computed
    by itself.
    """
    try:
        batch = _singlepoint_jobs(directories)
        if not batch:
            return {}
        params = next(iter(batch.values()))[0]
        engine = get_engine(params.engine)
        signal.setitimer(signal.ITIMER_REAL, len(batch) * params.timeout_seconds)
        results = engine.predict([atoms for _, atoms in batch.values()], params)
        return dict(zip(batch, results, strict=True))
    except Exception:
        traceback.print_exc(file=sys.stdout)
        print("batch prediction failed: computing each structure by itself", flush=True)
        return {}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _singlepoint_jobs(directories: list[Path]) -> dict[Path, tuple[CalculationParameters, Atoms]]:
    """Return the jobs a batch prediction can compute: singlepoints of a BatchPredictor
    engine with the parameters of the first of them."""
    jobs = {directory: _job(directory) for directory in directories}
    singlepoints = {d: job for d, job in jobs.items() if job[0].kind is CalculationKind.singlepoint}
    if not singlepoints:
        return {}
    first = next(iter(singlepoints.values()))[0]
    if not isinstance(get_engine(first.engine), BatchPredictor):
        return {}
    return {d: job for d, job in singlepoints.items() if job[0] == first}


def main(argv: list[str]) -> int:
    """Run each directory in ``argv``; return 0 (per-job failures are in their status)."""
    signal.signal(signal.SIGALRM, _on_alarm)
    directories = [Path(arg) for arg in argv]
    for start in range(0, len(directories), PREDICT_AHEAD):
        group = directories[start : start + PREDICT_AHEAD]
        predicted = predict_singlepoints(group)
        for directory in group:
            print(f"--- {directory.name}", flush=True)
            run_job(directory, predicted.get(directory))
            print(f"{DONE_MARKER}{directory}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
