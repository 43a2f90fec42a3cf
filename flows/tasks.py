"""The four reusable steps of every simulation, as Prefect tasks.

validate -> prepare-inputs -> run-engine -> parse-results. Each takes many structures, so
a screen pays Prefect's per-task cost once per step (run-engine: once per chunk), not per
structure.

validate, prepare-inputs and parse-results run in the flow's process and are ``async``:
there they share the flow's API client, where a sync task would open a new one (Prefect
builds a fresh TLS context for each, about 25 ms). run-engine is sync and goes to Dask.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.units import GPa, Hartree
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.logging.handlers import APILogHandler
from prefect.logging.loggers import PrefectLogAdapter
from prefect.tasks import exponential_backoff

from atomforge.engines import get_engine
from atomforge.engines.base import STRUCTURE_FILE, Engine, EngineResults
from atomforge.engines.errors import EngineError, InputError, RunStopped
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.runloop import RunControl, run_jobs
from atomforge.engines.status import JobStatus, Status
from atomforge.engines.structures import (
    NamedStructure,
    check_electrons,
    check_geometry,
    read_structures,
    to_extxyz,
)
from atomforge.flows.claims import CLAIM_FILE, claimed_directories
from atomforge.flows.models import StructureResult, StructureSource
from atomforge.flows.paths import RunPaths
from atomforge.flows.settings import get_settings
from atomforge.flows.store import save_result

_settings = get_settings()


def is_worth_retrying(task, task_run, state) -> bool:
    """Return True only for failures another attempt can fix (never for bad input or stops)."""
    try:
        state.result()
    except EngineError as exc:
        return exc.retryable
    except (InputError, RunStopped):
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


RETRYING = {
    "retries": _settings.retries,
    "retry_delay_seconds": exponential_backoff(_settings.retry_backoff_seconds),
    "retry_jitter_factor": _settings.retry_jitter,
    "retry_condition_fn": is_worth_retrying,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


@dataclass
class Job:
    """One structure on its way through the steps."""

    index: int
    name: str
    atoms: Atoms
    directory: Path

    @cached_property
    def input_extxyz(self) -> str:
        """Return the input structure as extended XYZ text (computed once)."""
        return to_extxyz(self.atoms)


@dataclass
class ValidatedInput:
    """Structures that passed validation, and those rejected (when asked to skip them)."""

    structures: list[NamedStructure]
    rejected: list[tuple[NamedStructure, str]] = field(default_factory=list)


@dataclass(frozen=True)
class RunContext:
    """What the steps need to know about the flow run they belong to."""

    flow_run_id: str
    flow_name: str
    paths: RunPaths
    results_root: Path


def validate_structure(
    structure: NamedStructure, params: CalculationParameters, engine: Engine, min_distance: float
) -> None:
    """Raise InputError unless ``engine`` can compute ``structure`` with ``params``."""
    check_geometry(structure.atoms, structure.name, min_distance)
    if engine.supports_charge:
        check_electrons(structure.atoms, params.charge, params.multiplicity, structure.name)
    try:
        engine.check(structure.atoms, params)
    except InputError as exc:
        raise InputError(f"{structure.name}: {exc}") from None


def check_inputs(
    source: StructureSource, params: CalculationParameters, skip_invalid: bool = False
) -> ValidatedInput:
    """Return the structures of ``source`` that pass every check; raise InputError otherwise.

    With ``skip_invalid`` an invalid structure is set aside with its reason instead.
    """
    engine = get_engine(params.engine)
    engine.check_installed(params)
    min_distance = get_settings().min_distance
    structures = read_structures(source.path, source.text, source.format)
    accepted: list[NamedStructure] = []
    rejected: list[tuple[NamedStructure, str]] = []
    for structure in structures:
        try:
            validate_structure(structure, params, engine, min_distance)
        except InputError as exc:
            if not skip_invalid:
                raise
            rejected.append((structure, str(exc)))
            continue
        accepted.append(structure)
    if not accepted:
        raise InputError(f"no valid structure to compute ({len(rejected)} rejected)")
    return ValidatedInput(accepted, rejected)


@task(name="validate", cache_policy=NO_CACHE, persist_result=False)
async def validate(
    source: StructureSource, params: CalculationParameters, skip_invalid: bool = False
) -> ValidatedInput:
    """Return the structures of ``source`` that pass every check (see :func:`check_inputs`).

    The checks run in a thread, so the flow's event loop goes on with what it started
    meanwhile (the run's artifacts).
    """
    validated = await asyncio.to_thread(check_inputs, source, params, skip_invalid)
    get_run_logger().info(
        "%d structure(s) valid for %s, %d rejected",
        len(validated.structures),
        params.engine,
        len(validated.rejected),
    )
    return validated


def plan_jobs(structures: list[NamedStructure], first_index: int, paths: RunPaths) -> list[Job]:
    """Return one job per structure, numbered from ``first_index``, each with its directory."""
    return [
        Job(index, s.name, s.atoms, paths.work_dir / f"{index:05d}-{s.name}")
        for index, s in enumerate(structures, start=first_index)
    ]


@task(name="prepare-inputs", **RETRYING)
async def prepare_inputs(jobs: list[Job], params: CalculationParameters) -> list[Job]:
    """Return ``jobs`` once their working directories hold the engine's input files.

    A claim left by an earlier attempt of the flow run is dropped: chunks may differ now.
    """
    engine = get_engine(params.engine)
    for job in jobs:
        job.directory.mkdir(parents=True, exist_ok=True)
        (job.directory / CLAIM_FILE).unlink(missing_ok=True)
        (job.directory / STRUCTURE_FILE).write_text(job.input_extxyz)
        engine.write_inputs(job.atoms, params, job.directory)
    return jobs


ENGINE_LOGGER = "prefect.atomforge.engine"


def _engine_output_to_api_only() -> None:
    """Send engine output to the Prefect API (the UI's run logs) but not to the console."""
    logger = logging.getLogger(ENGINE_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


class OutputStreamer:
    """Streams engine output to the run's logs in blocks: at most one record a second.

    One record per output line would cost more than the engines themselves on fast
    structures, so output goes out in blocks, each at most ``max_chars`` long. When an
    engine writes faster than that (xtb prints about 40 kB per small molecule), a block
    keeps its latest lines and says how many earlier ones were left out: the run logs
    stay live without turning Prefect's database into an output archive. The complete
    output is always in each working directory's log file.
    """

    def __init__(self, max_chars: int, interval: float = 1.0) -> None:
        run_logger = get_run_logger()
        self.logger = PrefectLogAdapter(logging.getLogger(ENGINE_LOGGER), run_logger.extra)
        self.max_chars = max_chars
        self.interval = interval
        self.parts: list[str] = []
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        """Take a block of output; send what has gathered if the interval has passed."""
        with self.lock:
            self.parts.append(text)
        if time.monotonic() - self.last_flush >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Send the output gathered so far (its latest ``max_chars`` characters)."""
        with self.lock:
            text, self.parts = "".join(self.parts), []
            self.last_flush = time.monotonic()
        text = text.rstrip("\n")
        if not text or self.max_chars <= 0:
            return
        if len(text) > self.max_chars:
            cut = len(text) - self.max_chars
            newline = text.find("\n", cut)
            start = newline + 1 if newline >= 0 else cut
            skipped = text.count("\n", 0, start)
            text = (
                f"[{skipped} earlier line(s) not sent; the working directories' logs have "
                f"them all]\n{text[start:]}"
            )
        self.logger.info("engine output:\n%s", text)


class ProgressReporter:
    """Reports the structures a run-engine task finishes, at a fixed cost.

    Each finished structure gets a marker line in the engine output stream; a failure is
    also logged at once as a warning; once a second at most, a progress line goes to the
    task's log. The run's progress bar is moved by the flow, as it stores results.
    """

    def __init__(self, own: int, logger: logging.LoggerAdapter, output: OutputStreamer) -> None:
        self.own = own
        self.logger = logger
        self.output = output
        self.finished = 0
        self.last_update = 0.0

    def __call__(self, directory: Path, status: JobStatus) -> None:
        """Record how ``directory`` ended; log progress if a second has passed."""
        self.finished += 1
        line = f"{directory.name}: {status.status} {status.message}".rstrip()
        self.output(f"== {line}\n")
        if not status.completed:
            self.logger.warning(line)
        now = time.monotonic()
        if now - self.last_update < 1.0:
            return
        self.last_update = now
        self.logger.info("%d finished (own chunk: %d); last %s", self.finished, self.own, line)


def _recorded(directories: Iterator[Path], ran: list[Path]) -> Iterator[Path]:
    """Yield ``directories``, adding each to ``ran`` as it is handed out."""
    for directory in directories:
        ran.append(directory)
        yield directory


def engine_owner(index: int) -> str:
    """Return the claim owner name of the run-engine task of chunk ``index``."""
    return f"run-engine-{index}"


@task(name="run-engine", **RETRYING)
def run_engine(
    chunks: list[list[Path]], index: int, params: CalculationParameters, run: RunContext
) -> list[Path]:
    """Run the engine on chunk ``index`` of the prepared directories; return those it ran.

    An engine that takes its directories one at a time then takes over the structures of
    other chunks that no task has started (see :mod:`atomforge.flows.claims`). Each directory it
    ran holds a ``status.json`` saying how it ended. This is the step that goes to a Dask
    worker: it takes only paths, so nothing heavy is serialized, and the working
    directories must be on a file system the flow shares.
    """
    if not chunks[index]:
        return []
    logger = get_run_logger()
    engine = get_engine(params.engine)
    logger.info("running %s on a chunk of %d structure(s)", engine.name, len(chunks[index]))
    run.paths.pid_dir.mkdir(parents=True, exist_ok=True)
    _engine_output_to_api_only()
    output = OutputStreamer(get_settings().engine_log_chars)
    ran: list[Path] = []
    claimed = claimed_directories(chunks, index, engine_owner(index), take_over=not engine.batch)
    control = RunControl(
        pid_dir=run.paths.pid_dir,
        stop_file=run.paths.stop_file,
        log=output,
        on_done=ProgressReporter(len(chunks[index]), logger, output),
        max_corrections=get_settings().max_corrections,
    )
    try:
        run_jobs(engine, _recorded(claimed, ran), params, control)
    finally:
        output.flush()
    taken_over = len(set(ran) - set(chunks[index]))
    logger.info("ran %d structure(s), %d taken over from other chunks", len(ran), taken_over)
    return ran


def make_result(
    job: Job,
    params: CalculationParameters,
    run: RunContext,
    status: JobStatus,
    engine: Engine | None = None,
) -> StructureResult:
    """Return the result document of ``job`` with its inputs and how it ended (no outputs)."""
    engine = engine or get_engine(params.engine)
    return StructureResult(
        id=f"{job.index:05d}-{job.name}",
        flow_run_id=run.flow_run_id,
        flow_name=run.flow_name,
        index=job.index,
        name=job.name,
        status=status.status,
        message=status.message,
        corrections=status.corrections,
        engine=engine.name,
        engine_version=engine.version(),
        parameters=params.model_dump(mode="json"),
        formula=job.atoms.get_chemical_formula(mode="hill"),
        n_atoms=len(job.atoms),
        input_structure=job.input_extxyz,
        wall_seconds=status.wall_seconds,
        workdir=str(job.directory),
    )


def fill_outputs(result: StructureResult, out: EngineResults) -> None:
    """Copy what the engine computed into ``result``, in the document's units."""
    result.energy_eV = out.energy
    result.energy_hartree = out.energy / Hartree
    result.energy_per_atom_eV = out.energy / len(out.atoms)
    result.gap_eV = out.gap
    result.fermi_level_eV = out.fermi_level
    result.converged = out.converged
    result.n_steps = out.n_steps
    result.final_structure = to_extxyz(out.atoms)
    if out.forces is not None:
        result.forces_eV_per_A = np.asarray(out.forces).tolist()
        result.max_force_eV_per_A = float(np.linalg.norm(out.forces, axis=1).max())
    if out.stress is not None:
        stress = np.asarray(out.stress, dtype=float).reshape(-1)
        result.stress_eV_per_A3 = stress.tolist()
        result.pressure_GPa = float(-stress[:3].mean() / GPa)
    if out.magmoms is not None:
        result.magnetic_moments = np.asarray(out.magmoms, dtype=float).tolist()
    result.magnetic_moment = out.magmom
    result.properties = out.properties
    if out.version:
        result.engine_version = out.version


def parse_job(
    job: Job, status: JobStatus, params: CalculationParameters, run: RunContext, engine: Engine
) -> StructureResult:
    """Return and store the result document of ``job``, with the engine's outputs if it finished."""
    result = make_result(job, params, run, status, engine)
    if status.completed:
        try:
            out = engine.read_results(job.directory, params)
        except (OSError, ValueError, KeyError) as exc:
            result.status = Status.failed
            result.message = f"cannot read results: {exc}"
        else:
            fill_outputs(result, out)
    save_result(run.results_root, result)
    return result


PARSE_POLL_SECONDS = 0.05


def _ended(chunk: list[Job], everything: bool) -> list[tuple[Job, JobStatus]]:
    """Return the jobs of ``chunk`` that have a status, with it.

    Unless ``everything``, only the two ends are looked at, each up to its first job that
    has not ended: the chunk's own task runs it from the front and tasks that take it over
    from the back, so the jobs in between have not ended either.
    """
    if everything:
        found = [(job, JobStatus.read(job.directory)) for job in chunk]
        return [(job, status) for job, status in found if status is not None]
    ended: dict[int, tuple[Job, JobStatus]] = {}
    for end in (chunk, chunk[::-1]):
        for job in end:
            status = None if job.index in ended else JobStatus.read(job.directory)
            if status is None:
                break
            ended[job.index] = (job, status)
    return list(ended.values())


@task(name="parse-results", **RETRYING)
async def parse_results(
    chunks: list[list[Job]],
    params: CalculationParameters,
    run: RunContext,
    engines_finished: Callable[[], bool] = lambda: True,
    on_parsed: Callable[[StructureResult], None] = lambda result: None,
) -> list[StructureResult]:
    """Return the stored result documents of the jobs that ended, parsing each as it ends.

    ``chunks`` holds the jobs of each run-engine task, in the order it runs them. How a
    job ended is read from its directory (``status.json``, written by the engine). While
    ``engines_finished()`` is False only completed jobs are parsed, since an engine may
    still retry the others; once it is True every job with a status is parsed. Jobs
    without one are left out: the caller knows why they never ran. ``on_parsed`` is told
    of each result as soon as it is stored.
    """
    engine = get_engine(params.engine)
    results = []
    pending = [list(chunk) for chunk in chunks]
    while any(pending):
        finished = engines_finished()
        progressed = False
        for chunk in pending:
            done = set()
            for job, status in _ended(chunk, finished):
                if finished or status.completed:
                    results.append(parse_job(job, status, params, run, engine))
                    on_parsed(results[-1])
                    done.add(job.index)
            chunk[:] = [job for job in chunk if job.index not in done]
            progressed = progressed or bool(done)
        if finished:
            break
        if not progressed:
            await asyncio.sleep(PARSE_POLL_SECONDS)
    return results
