"""Run ASE-calculator jobs prepared by :class:`atomforge.engines.ase_engine.AseEngine`.

Usage: ``python -m atomforge.engines.ase_runner DIR [DIR ...]``. Each directory gets a
``runner-status.json`` (the run loop diagnoses it and writes ``status.json``); results
go to ``final.extxyz`` and ``results.json``, and an
optimization's path, one frame a step with energy and forces, to ``opt.extxyz`` as it
goes. A job past its ``timeout_seconds`` is interrupted and marked ``timeout``; the next
job still runs.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.optimize import BFGS

from atomforge.engines.ase_engine import FINAL_FILE, INPUT_FILE, JOB_FILE, RESULTS_FILE
from atomforge.engines.base import DONE_MARKER
from atomforge.engines.parameters import CalculationKind
from atomforge.engines.registry import get_engine, parse_parameters
from atomforge.engines.status import RUNNER_STATUS_FILE, JobStatus, Status

TRAJECTORY_FILE = "opt.extxyz"
TRAJECTORY_PROPERTIES = ("energy", "free_energy", "forces", "stress")


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


def compute(directory: Path) -> dict:
    """Run the job in ``directory`` and return its results summary."""
    job = json.loads((directory / JOB_FILE).read_text())
    params = parse_parameters(job["parameters"])
    engine = get_engine(params.engine)
    atoms = read(directory / INPUT_FILE, format="extxyz")
    atoms.calc = engine.make_calculator(params)
    converged = None
    n_steps = None
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
    extras = engine.extra_properties(atoms.calc)
    write(directory / FINAL_FILE, atoms, format="extxyz")
    return {
        "energy": energy,
        "converged": converged,
        "n_steps": n_steps,
        "gap": extras.pop("gap", None),
        "properties": extras,
    }


def run_job(directory: Path) -> JobStatus:
    """Compute one directory under its time limit and return the status written there."""
    params = json.loads((directory / JOB_FILE).read_text())["parameters"]
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, float(params["timeout_seconds"]))
    try:
        summary = compute(directory)
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


def main(argv: list[str]) -> int:
    """Run each directory in ``argv``; return 0 (per-job failures are in their status)."""
    signal.signal(signal.SIGALRM, _on_alarm)
    for arg in argv:
        directory = Path(arg)
        print(f"--- {directory.name}", flush=True)
        run_job(directory)
        print(f"{DONE_MARKER}{directory}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
