"""The one loop every engine runs in: claim, stop?, run, classify, diagnose, correct, rerun.

An engine only says what to write, how to launch and how to read (:mod:`.base`); this
module owns what every engine shares, so they all have the same crash semantics:

- a directory that already completed is skipped (a retried task resumes);
- a stop file stops the loop, and a running process is killed with its whole tree (a
  process killed once the stop file is there ends as ``stopped``, not ``crashed``);
- a process killed from outside ends as ``crashed``, which is retryable;
- a finished job is diagnosed; a problem that one of the engine's handlers fixes is
  corrected and the job runs again, at most ``max_corrections`` times; every correction
  is recorded in the job's status (and so in its result document).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ase.io import read

from atomforge.engines.base import (
    DONE_MARKER,
    STRUCTURE_FILE,
    Correction,
    Engine,
    Problem,
)
from atomforge.engines.errors import EngineError, RunStopped
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.process import (
    LineSplitter,
    ProcessOutcome,
    engine_environment,
    run_process,
)
from atomforge.engines.status import RUNNER_STATUS_FILE, JobStatus, Status, status_from_exit
from atomforge.engines.warm_runner import prewarm

OutputSink = Callable[[str], None]
"""Takes engine output text as it arrives: blocks of any size, not necessarily whole lines."""
BATCH_START_SECONDS = 60.0
"""Time a batch runner is given to start, on top of each structure's own time limit."""


@dataclass
class RunControl:
    """How the loop reports and is controlled: pid records, stop file, output, callbacks."""

    pid_dir: Path
    stop_file: Path
    log: OutputSink
    on_done: Callable[[Path, JobStatus], None]
    max_corrections: int = 3


@dataclass
class _Attempt:
    """One job across its attempts: parameters as corrected so far, corrections, time."""

    directory: Path
    params: CalculationParameters
    corrections: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    started_at: float = field(default_factory=time.time)


def run_jobs(
    engine: Engine,
    directories: Iterable[Path],
    params: CalculationParameters,
    control: RunControl,
) -> None:
    """Run ``engine`` on each directory, writing a ``status.json`` into every one.

    Directories are taken from ``directories`` one at a time, just before each runs (a
    batch engine takes them all at once). Raises :class:`RunStopped` when the run was
    stopped, and a retryable :class:`EngineError` when a process was killed from outside;
    completed directories are skipped when the step is retried.
    """
    run = _run_batch if engine.batch else _run_each
    statuses = run(engine, directories, params, control)
    if any(s.status is Status.stopped for s in statuses):
        raise RunStopped(f"{engine.name}: run was stopped")
    crashed = [s for s in statuses if s.status is Status.crashed]
    if crashed:
        raise EngineError(f"{engine.name}: {crashed[0].message}", retryable=True)


def prepare_runner(engine: Engine, params: CalculationParameters, fork: bool = False) -> None:
    """Start, in this process, the warm zygote that a batch ``engine``'s runner for
    ``params`` will be forked from, with the engine's calculator imported (see
    :mod:`atomforge.engines.warm_runner`; ``fork`` as :func:`~atomforge.engines.warm_runner.prewarm`
    says), so that its imports overlap what comes before the first chunk. Other engines
    start no runner: nothing happens."""
    if not engine.batch:
        return
    command = engine.command(params, [])
    prewarm(command.argv, engine_environment(command.env), engine.name, fork)


def _run_each(
    engine: Engine,
    directories: Iterable[Path],
    params: CalculationParameters,
    control: RunControl,
) -> list[JobStatus]:
    """Run one process per directory, correcting and rerunning as the handlers say."""
    statuses = []
    for directory in directories:
        if _already_completed(directory):
            continue
        if control.stop_file.exists():
            raise RunStopped(f"{engine.name}: run was stopped")
        attempt = _Attempt(directory, params)
        while True:
            outcome = _launch(engine, [directory], attempt.params, control, directory)
            status = _told_to_stop(status_from_exit(outcome, directory / engine.log_name), control)
            attempt.wall_seconds += outcome.wall_seconds
            if not _retry_corrected(engine, attempt, status, control.max_corrections):
                break
        _finish(attempt, status, control)
        statuses.append(status)
        if status.status is Status.stopped:
            break
    return statuses


def _run_batch(
    engine: Engine,
    directories: Iterable[Path],
    params: CalculationParameters,
    control: RunControl,
) -> list[JobStatus]:
    """Run the unfinished directories in one runner process; rerun corrected ones together."""
    attempts = {d: _Attempt(d, params) for d in directories if not _already_completed(d)}
    statuses: list[JobStatus] = []
    pending = list(attempts)
    while pending:
        if control.stop_file.exists():
            raise RunStopped(f"{engine.name}: run was stopped")
        pending = _batch_round(engine, [attempts[d] for d in pending], control, statuses)
    return statuses


def _batch_round(
    engine: Engine, attempts: list[_Attempt], control: RunControl, statuses: list[JobStatus]
) -> list[Path]:
    """Run one runner process over ``attempts``; return the directories to run again.

    The runner writes each job's :data:`RUNNER_STATUS_FILE` and prints a
    :data:`DONE_MARKER` line; the job is diagnosed (and its ``status.json`` written, so
    the flow can parse it) right then, while the runner goes on with the next. Settled
    jobs' statuses are appended to ``statuses``.
    """
    waiting = {attempt.directory: attempt for attempt in attempts}
    rerun: list[Path] = []

    def settle(directory: Path, status: JobStatus) -> None:
        attempt = waiting.pop(directory)
        attempt.wall_seconds += status.wall_seconds
        if _retry_corrected(engine, attempt, status, control.max_corrections):
            rerun.append(directory)
            return
        _finish(attempt, status, control)
        statuses.append(status)

    def on_report(directory: Path) -> None:
        if directory in waiting:
            status = JobStatus.read(directory, RUNNER_STATUS_FILE)
            settle(directory, status or JobStatus(Status.failed, "runner wrote no status"))

    directories = list(waiting)
    for directory in directories:
        (directory / RUNNER_STATUS_FILE).unlink(missing_ok=True)
    params = attempts[0].params
    outcome = _launch(engine, directories, params, control, directories[0].parent, on_report)
    for directory in list(waiting):
        settle(directory, _told_to_stop(_unfinished(outcome), control))
    return rerun


def _launch(
    engine: Engine,
    directories: Sequence[Path],
    params: CalculationParameters,
    control: RunControl,
    cwd: Path,
    on_report: Callable[[Path], None] | None = None,
) -> ProcessOutcome:
    """Run the engine's command on ``directories`` in ``cwd`` and return how it ended.

    With ``on_report`` (a batch runner) the output is split into lines: each
    :data:`DONE_MARKER` line goes to ``on_report`` as a directory, the rest is output.
    """
    command = engine.command(params, list(directories))
    sink: Callable[[str], None] = control.log
    lines = None
    if on_report is not None:

        def on_line(line: str) -> None:
            if line.startswith(DONE_MARKER):
                on_report(Path(line[len(DONE_MARKER) :]))
            else:
                control.log(line + "\n")

        lines = sink = LineSplitter(on_line)
    timeout = params.timeout_seconds * len(directories)
    if len(directories) > 1 or engine.batch:
        timeout += BATCH_START_SECONDS
    log_name = f"{directories[0].name}.runner.log" if engine.batch else engine.log_name
    try:
        outcome = run_process(
            command.argv,
            cwd=cwd,
            timeout=timeout,
            pid_dir=control.pid_dir,
            stop_file=control.stop_file,
            log=sink,
            log_name=log_name,
            env=command.env,
        )
    except OSError as exc:
        raise EngineError(
            f"{engine.name}: cannot start {command.argv[0]!r}: {exc}", retryable=True
        ) from None
    if lines is not None:
        lines.close()
    return outcome


def _retry_corrected(
    engine: Engine, attempt: _Attempt, status: JobStatus, max_corrections: int
) -> bool:
    """Diagnose a finished job; return True once a handler has corrected it for a rerun.

    A problem that is not corrected (no handler, handler gives up, or corrections used
    up) turns ``status`` into a failure that tells the whole story.
    """
    if status.status not in (Status.completed, Status.failed):
        return False
    problem = engine.diagnose(attempt.directory, attempt.params, status)
    if problem is None:
        return False
    handler = next((h for h in engine.handlers if h.fixes == problem.code), None)
    correction = None
    if handler is not None and len(attempt.corrections) < max_corrections:
        correction = handler.correct(engine, attempt.directory, attempt.params, problem)
    if correction is None:
        _fail(status, problem, attempt.corrections)
        return False
    _apply(engine, attempt, problem, correction)
    return True


def _apply(engine: Engine, attempt: _Attempt, problem: Problem, correction: Correction) -> None:
    """Record ``correction`` and rewrite the job's inputs with it."""
    options = attempt.params.options.model_copy(update=correction.options)
    attempt.params = attempt.params.model_copy(update={"options": options})
    attempt.corrections.append(
        {
            "problem": problem.code,
            "message": problem.message,
            "action": correction.action,
            "options": correction.options,
        }
    )
    directory = attempt.directory
    atoms = correction.atoms
    if atoms is None:
        atoms = read(directory / STRUCTURE_FILE, format="extxyz")
    engine.write_inputs(atoms, attempt.params, directory)


def _fail(status: JobStatus, problem: Problem, corrections: list[dict]) -> None:
    """Make ``status`` a failure with ``problem`` and every correction tried before it."""
    status.status = Status.failed
    status.message = problem.message
    if corrections:
        tried = "; ".join(c["action"] for c in corrections)
        status.message += f" (after {len(corrections)} correction(s): {tried})"


def _finish(attempt: _Attempt, status: JobStatus, control: RunControl) -> None:
    """Write the final status of a job, with its corrections and time, and report it."""
    status.started_at = attempt.started_at
    status.corrections = attempt.corrections
    status.wall_seconds = attempt.wall_seconds
    status.write(attempt.directory)
    control.on_done(attempt.directory, status)


def _told_to_stop(status: JobStatus, control: RunControl) -> JobStatus:
    """Return ``status``, as ``stopped`` if the process was killed after the run was told
    to stop (a hook kills the recorded engines right after it writes the stop file)."""
    if status.status is Status.crashed and control.stop_file.exists():
        return JobStatus(Status.stopped, "run was stopped", status.wall_seconds, status.returncode)
    return status


def _already_completed(directory: Path) -> bool:
    """Return True when ``directory`` already holds a completed job."""
    status = JobStatus.read(directory)
    return status is not None and status.completed


def _unfinished(outcome: ProcessOutcome) -> JobStatus:
    """Return the status of a job a batch runner never finished, from how the runner ended."""
    wall = outcome.wall_seconds
    if outcome.stopped:
        return JobStatus(Status.stopped, "run was stopped", wall, outcome.returncode)
    if outcome.timed_out:
        return JobStatus(Status.timeout, "runner exceeded its time limit", wall)
    if outcome.returncode < 0:
        return JobStatus(Status.crashed, f"runner killed by signal {-outcome.returncode}", wall)
    return JobStatus(Status.failed, f"runner exited with code {outcome.returncode}", wall)
