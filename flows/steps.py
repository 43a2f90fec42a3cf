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
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger

from atomforge.engines import get_engine
from atomforge.engines.base import STRUCTURE_FILE
from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.runloop import RunControl, run_jobs
from atomforge.engines.status import JobStatus
from atomforge.flows.jobs import Job, RunContext, engine_owner
from atomforge.flows.models import StructureResult, StructureSource
from atomforge.flows.scheduling.claims import CLAIM_FILE, claimed_directories
from atomforge.flows.scheduling.cores import hold_cores
from atomforge.flows.settings import get_settings
from atomforge.flows.store.documents import parse_job
from atomforge.flows.ui.engine_output import (
    OutputStreamer,
    ProgressReporter,
    engine_output_to_api_only,
)
from atomforge.flows.validation import ValidatedInput, check_inputs

STEP_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": False}
"""Steps are never cached and keep no Prefect result: their outputs are files and documents."""


@task(name="validate", **STEP_OPTIONS)
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


@task(name="prepare-inputs", **STEP_OPTIONS)
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


def engine_cores(cores: int) -> AbstractContextManager:
    """Return a context that holds ``cores`` of the host's cores limit
    (``ATOMFORGE_CORES_LIMIT``), waiting for them, or does nothing when none is set."""
    settings = get_settings()
    if not settings.cores_limit:
        return nullcontext()
    return hold_cores(settings.cores_limit, cores, settings.cores_lock_dir)


async def engine_limit_tags(engine: str) -> set[str]:
    """Return ``{engine}`` when the server has a tag concurrency limit named after the
    engine (``prefect concurrency-limit create vasp 4``), otherwise an empty set.

    Prefect asks the server for slots for each tag of a task run before the task starts
    (0.1-0.4 s a task here), so run-engine carries its engine's tag only where a site has
    set such a limit. Checked once per run: a limit created later counts from the next run.
    """
    async with get_client() as client:
        try:
            await client.read_concurrency_limit_by_tag(engine)
        except ObjectNotFound:
            return set()
    return {engine}


def _recorded(directories: Iterator[Path], ran: list[Path]) -> Iterator[Path]:
    """Yield ``directories``, adding each to ``ran`` as it is handed out."""
    for directory in directories:
        ran.append(directory)
        yield directory


@task(name="run-engine", **STEP_OPTIONS)
def run_engine(
    chunks: list[list[Path]], index: int, params: CalculationParameters, run: RunContext
) -> list[Path]:
    """Run the engine on chunk ``index`` of the prepared directories; return those it ran.

    An engine that takes its directories one at a time then takes over the structures of
    other chunks that no task has started (see :mod:`atomforge.flows.scheduling.claims`).
    Each directory it ran holds a ``status.json`` saying how it ended. This is the step
    that goes to a Dask worker: it takes only paths, so nothing heavy is serialized, and
    the working directories must be on a file system the flow shares (InputError if not).
    """
    if not chunks[index]:
        return []
    if not chunks[index][0].is_dir():
        raise InputError(
            f"{chunks[index][0]} is not visible on Dask worker host {socket.gethostname()}: "
            "put ATOMFORGE_WORK_ROOT on a file system the flow and every worker mount"
        )
    logger = get_run_logger()
    engine = get_engine(params.engine)
    logger.info("running %s on a chunk of %d structure(s)", engine.name, len(chunks[index]))
    run.paths.pid_dir.mkdir(parents=True, exist_ok=True)
    engine_output_to_api_only()
    output = OutputStreamer(get_settings().engine_log_chars)
    ran: list[Path] = []
    claimed = claimed_directories(chunks, index, engine_owner(index), take_over=not engine.batch)
    control = RunControl(
        pid_dir=run.paths.pid_dir,
        stop_file=run.paths.stop_file,
        log=output,
        on_done=ProgressReporter(
            len(chunks[index]), logger, output, engine.log_name, get_settings().failure_log_lines
        ),
        max_corrections=get_settings().max_corrections,
    )
    try:
        with engine_cores(params.cores):
            run_jobs(engine, _recorded(claimed, ran), params, control)
    finally:
        output.flush()
    taken_over = len(set(ran) - set(chunks[index]))
    logger.info("ran %d structure(s), %d taken over from other chunks", len(ran), taken_over)
    return ran


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


@task(name="parse-results", **STEP_OPTIONS)
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
