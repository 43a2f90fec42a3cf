"""The shared body of ``simulate`` and ``screen``: validate, prepare, run per chunk, parse."""

from __future__ import annotations

import asyncio
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import dask
from prefect.context import FlowRunContext
from prefect.exceptions import Pause
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

from atomforge.engines import get_engine
from atomforge.engines.errors import AtomforgeError, InputError, RunStopped
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.runloop import prepare_runner
from atomforge.engines.status import RUNNER_STATUS_FILE, STATUS_FILE, JobStatus, Status
from atomforge.flows.hooks import begin_attempt, record_ending, stop_run_engines
from atomforge.flows.jobs import Job, RunContext, engine_owner, plan_jobs
from atomforge.flows.models import (
    RunOptions,
    RunSummary,
    StructureResult,
    StructureSource,
)
from atomforge.flows.paths import RunPaths, run_paths, writable_roots
from atomforge.flows.retry import retrying
from atomforge.flows.scheduling.chunking import balanced_chunks, estimated_cost, n_chunks
from atomforge.flows.scheduling.claims import claim_owner
from atomforge.flows.scheduling.dask_runner import InProcessDaskTaskRunner, engine_slots
from atomforge.flows.settings import KeepWorkdir, Settings, get_settings
from atomforge.flows.steps import (
    engine_limit_tags,
    parse_results,
    prepare_inputs,
    run_engine,
    validate,
)
from atomforge.flows.store.documents import make_result, parse_job, planned_result, reused_result
from atomforge.flows.store.files import load_plan, load_result, save_plan, save_result, save_run
from atomforge.flows.store.index import find_completed
from atomforge.flows.store.keys import input_key
from atomforge.flows.ui import artifacts, plots
from atomforge.flows.ui.progress import RunProgress

ENGINE_STOP_POLL_SECONDS = 0.1


def _unrun_results(
    jobs: list[Job], params: CalculationParameters, run: RunContext, status: JobStatus
) -> list[StructureResult]:
    """Return (and store) results saying ``status`` for jobs that produced none."""
    results = []
    for job in jobs:
        result = make_result(job, params, run, status)
        if not job.directory.exists():
            result.workdir = None
        save_result(run.results_root, result)
        results.append(result)
    return results


async def _follow(
    engine_runs: list[PrefectFuture],
    chunks: list[list[Job]],
    params: CalculationParameters,
    run: RunContext,
    progress: RunProgress,
) -> list[StructureResult]:
    """Return the results of every chunk, parsed as the engine runs finish each structure.

    Structures that never ended, because the engine run that claimed them (or, if none
    did, their chunk's) failed or the parse failed, get ``failed`` results that say why
    (``stopped`` where that engine run was stopped).
    A failed parse also stops the engines: what they would compute could not be read.
    """

    def engines_finished() -> bool:
        return all(engine_run.wrapped_future.done() for engine_run in engine_runs)

    try:
        results = await retrying(parse_results)(
            quote(chunks),  # quoted: Prefect need not walk every job's Atoms for futures
            params,
            run,
            engines_finished=engines_finished,
            on_parsed=progress.advance,
        )
    except Exception as exc:
        stop_run_engines(run.paths)
        while not engines_finished():
            await asyncio.sleep(ENGINE_STOP_POLL_SECONDS)
        jobs = [job for chunk in chunks for job in chunk]
        return _unrun_results(jobs, params, run, JobStatus(Status.failed, _describe(exc)))
    parsed = {result.index for result in results}
    owners = {engine_owner(index): engine_run for index, engine_run in enumerate(engine_runs)}
    for engine_run, chunk in zip(engine_runs, chunks):
        for job in chunk:
            if job.index in parsed:
                continue
            outcome = owners.get(claim_owner(job.directory), engine_run).result(
                raise_on_failure=False
            )
            reason = (
                _describe(outcome) if isinstance(outcome, BaseException) else "engine never ran"
            )
            ending = Status.stopped if isinstance(outcome, RunStopped) else Status.failed
            results += _unrun_results([job], params, run, JobStatus(ending, reason))
    return results


def _resume(
    jobs: list[Job],
    previous: dict[str, StructureResult],
    params: CalculationParameters,
    run: RunContext,
) -> tuple[list[StructureResult], list[Job]]:
    """Return the results an earlier attempt of this flow run finished and the jobs still
    to compute (a retry computes only what has no completed result).

    A job the earlier attempt planned with the same input key keeps its completed
    document, or, if it finished but was never parsed, is parsed from its folder. Any
    other job's folder loses the status an earlier run left there, so it runs again.
    """
    engine = get_engine(params.engine)
    resumed, to_compute = [], []
    for job in jobs:
        before = previous.get(job.directory.name)
        if before is not None and before.input_key == job.input_key:
            stored = load_result(run.results_root, run.flow_run_id, before.id)
            if stored is not None and stored.ok and stored.input_key == job.input_key:
                resumed.append(stored)
                continue
            status = _status_in(job.directory)
            if status is not None and status.completed:
                result = parse_job(job, status, params, run, engine)
                if result.ok:
                    resumed.append(result)
                    continue
        for name in (STATUS_FILE, RUNNER_STATUS_FILE):
            (job.directory / name).unlink(missing_ok=True)
        to_compute.append(job)
    return resumed, to_compute


def _status_in(directory: Path) -> JobStatus | None:
    """Return the status stored in ``directory``, or None if none can be read."""
    try:
        return JobStatus.read(directory)
    except (OSError, ValueError, TypeError):
        return None


def _reuse_stored(
    jobs: list[Job], run: RunContext, reuse: bool
) -> tuple[list[StructureResult], list[Job]]:
    """Return the results reused from the store and the jobs still to compute.

    With ``reuse``, a job whose input key has a stored completed result gets a document
    made from it (one index look-up for the whole run).
    """
    if not reuse:
        return [], jobs
    found = find_completed(run.results_root, [job.input_key for job in jobs])
    reused, to_compute = [], []
    for job in jobs:
        origin = found.get(job.input_key)
        stored = load_result(run.results_root, *origin) if origin else None
        if stored is None:
            to_compute.append(job)
        else:
            reused.append(reused_result(job, run, stored))
    return reused, to_compute


def _plan(
    jobs: list[Job], params: CalculationParameters, run: RunContext
) -> dict[str, StructureResult]:
    """Give each job its input key and store the run's plan (each job's ``not-started``
    document); return the plan an earlier attempt of this flow run stored, by id."""
    engine = get_engine(params.engine)
    version = engine.version()
    for job in jobs:
        job.input_key = input_key(job.atoms, params, version)
    previous = {result.id: result for result in load_plan(run.paths.plan_file)}
    save_plan(run.paths.plan_file, [planned_result(job, params, run, engine) for job in jobs])
    return previous


def verdict(results: list[StructureResult], max_failed_fraction: float) -> tuple[bool, str]:
    """Return whether a run of ``results`` succeeded, and a message with the counts.

    It fails when more than ``max_failed_fraction`` of its structures did not complete
    (failed, timed out, crashed, stopped, not started), or when it had none to compute.
    Invalid structures skipped with ``skip_invalid`` count neither way: they are reported,
    and the fraction is of the structures that were computed (or reused).
    """
    invalid = sum(result.status is Status.invalid for result in results)
    computed = len(results) - invalid
    completed = sum(result.ok for result in results)
    failed = computed - completed
    skipped = f", {invalid} invalid skipped" if invalid else ""
    message = f"{completed} of {computed} completed, {failed} failed{skipped}"
    if computed == 0:
        return False, f"no structure to compute{skipped}"
    if failed > max_failed_fraction * computed:
        limit = f"more than max_failed_fraction {max_failed_fraction:g} allows"
        return False, f"{failed} of {computed} failed, {limit} ({completed} completed{skipped})"
    return True, message


def max_failed_fraction(options: RunOptions, settings: Settings) -> float:
    """Return the failure fraction a run tolerates: its options', else the setting's."""
    if options.max_failed_fraction is not None:
        return options.max_failed_fraction
    return settings.max_failed_fraction


def _describe(exc: BaseException) -> str:
    """Return ``exc`` as one line: its type and message."""
    return f"{type(exc).__name__}: {exc}"


def _clean_workdirs(
    results: list[StructureResult], work_dir: Path, policy: KeepWorkdir
) -> list[StructureResult]:
    """Remove working directories the keep policy does not keep; return the results changed.

    A result whose directory is removed forgets it (its ``workdir`` becomes None). A
    reused result's directory belongs to the run that computed it and is left alone.
    """
    if policy is KeepWorkdir.always:
        return []
    own = [result for result in results if not result.reused_from]
    changed = []
    for result in own:
        if result.workdir and (policy is KeepWorkdir.never or result.ok):
            shutil.rmtree(result.workdir, ignore_errors=True)
            result.workdir = None
            changed.append(result)
    if policy is KeepWorkdir.never or not any(r.workdir for r in own):
        shutil.rmtree(work_dir, ignore_errors=True)
    return changed


@dataclass
class RunOutcome:
    """The results of a run (input order), where they are stored, its progress bar, and
    its verdict: whether it succeeded (see :func:`verdict`) and a message with the counts."""

    results: list[StructureResult]
    results_dir: Path
    progress: RunProgress
    ok: bool = True
    message: str = ""
    plotting: asyncio.Future | None = None
    """A single run's plots, drawn and published while :meth:`publish` sends the rest."""

    def final_state(self, data: Any) -> State:
        """Return the flow's final state, carrying ``data``: Completed, or Failed when more
        structures failed than the run tolerates; either way with the counts as message."""
        return (Completed if self.ok else Failed)(message=self.message, data=data)

    async def publish(
        self,
        key: str,
        title: str,
        ranked: list[StructureResult] | None = None,
        rank_by: str | None = None,
    ) -> None:
        """Publish the run's table and summary (``ranked`` orders the table by the result
        field ``rank_by``); fill the bar; wait for a single run's plots."""
        rows = self.results if ranked is None else ranked
        try:
            await asyncio.gather(
                artifacts.publish(key, title, rows, self.results_dir, rank_by),
                self.progress.finish(),
                *([self.plotting] if self.plotting else []),
            )
        finally:
            if self.plotting:  # not left running past the run when the rest failed
                self.plotting.cancel()


@dataclass(frozen=True)
class Lineage:
    """The workflow run and step a run belongs to."""

    workflow_run_id: str
    step: str


async def run_structures(
    source: StructureSource,
    params: CalculationParameters,
    options: RunOptions,
    title: str,
    lineage: Lineage | None = None,
    single: bool = False,
) -> RunOutcome:
    """Run every structure of ``source`` through the four steps and return the outcome.

    Must be awaited inside a flow. Each step is one task: validate, prepare-inputs and
    parse-results run here; run-engine goes to Dask once per chunk, one chunk per worker
    thread, balanced by estimated cost. Structures are parsed as they finish. Each
    structure's result and a run summary are stored as JSON as soon as they are known; a
    failed chunk yields ``failed`` results, not a crash. A ``single`` run refuses a
    source of more than one structure before any engine starts.

    A results or work folder that cannot be written fails the run before anything runs.
    A new attempt of the same flow run (a retry) clears the stop file its predecessor's
    hook left and computes only the structures without a completed result. However the
    run ends, ``run.json`` says how, and every structure has a document.
    """
    settings = get_settings()
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id)
    flow_name = context.flow.name
    _, results_root = writable_roots(settings)
    paths = run_paths(settings, flow_run_id, options.run_dir)
    summary = RunSummary(
        flow_run_id=flow_run_id,
        flow_name=flow_name,
        state="Running",
        engine=params.engine,
        parameters=params.model_dump(mode="json"),
        source=source.model_dump(mode="json"),
        work_dir=str(paths.work_dir),
        started_at=datetime.now(timezone.utc),
        workflow_run_id=lineage.workflow_run_id if lineage else None,
        step=lineage.step if lineage else None,
    )
    try:
        save_run(results_root, summary)
    except OSError as exc:
        folder = results_root / flow_run_id
        raise InputError(f"results folder {folder}: cannot be written: {exc.strerror}") from None
    run = RunContext(
        flow_run_id,
        flow_name,
        paths,
        results_root,
        lineage.workflow_run_id if lineage else None,
        lineage.step if lineage else None,
    )
    if begin_attempt(paths):
        get_run_logger().warning("killed engines an earlier attempt of this run left running")
    tolerance = 0.0 if single else max_failed_fraction(options, settings)
    progress = RunProgress(flow_name, title, get_run_logger())
    limits = _settled(asyncio.ensure_future(engine_limit_tags(params.engine)))  # before links
    plotting: asyncio.Future | None = None
    links = asyncio.ensure_future(
        artifacts.publish_files(
            flow_name,
            flow_run_id,
            results_root / flow_run_id,
            paths.work_dir,
            settings.keep_workdir.value,
        )
    )
    try:
        validated = await validate(source, params, options.skip_invalid)
        found = len(validated.structures) + len(validated.rejected)
        if single and found != 1:
            raise InputError(f"simulate takes one structure, the source has {found}: use screen")
        slots = engine_slots(context.task_runner, settings, params.cores)
        planned = plan_jobs(validated.structures, 0, paths)
        progress.total = len(planned)
        rejected = plan_jobs(
            [structure for structure, _ in validated.rejected], len(planned), paths
        )
        invalid = [
            result
            for job, (_, message) in zip(rejected, validated.rejected)
            for result in _unrun_results([job], params, run, JobStatus(Status.invalid, message))
        ]
        previous = _plan(planned, params, run)
        resumed, jobs = _resume(planned, previous, params, run)
        reuse = settings.reuse if options.reuse is None else options.reuse
        reused, jobs = _reuse_stored(jobs, run, reuse)
        if jobs and isinstance(context.task_runner, InProcessDaskTaskRunner):
            prepare_runner(get_engine(params.engine), params)  # its chunks run in this process
        for result in resumed + reused:
            progress.advance(result)
        if not single:  # one structure: its bar and the run's state say it all
            progress.watch(jobs)
        chunks = balanced_chunks(
            jobs,
            [estimated_cost(job.atoms) for job in jobs],
            n_chunks(len(jobs), slots.slots, options.chunk_size or settings.chunk_size),
        )
        get_run_logger().info(
            "%d structure(s) to compute in %d chunk(s), %d at a time, %d reused, "
            "%d done by an earlier attempt; work dir %s",
            len(jobs),
            len(chunks),
            slots.slots,
            len(reused),
            len(resumed),
            paths.work_dir,
        )
        results = resumed + reused
        if jobs:
            await retrying(prepare_inputs)(
                quote([job for chunk in chunks for job in chunk]), params
            )
            directories = [[job.directory for job in chunk] for chunk in chunks]
            limit_tags = await limits
            with dask.annotate(resources=slots.resources) if slots.resources else nullcontext():
                run_chunk = retrying(run_engine, tuple(limit_tags))
                engine_runs = [
                    run_chunk.submit(directories, index, params, run)
                    for index in range(len(chunks))
                ]
            results += await _follow(engine_runs, chunks, params, run, progress)
        results.sort(key=lambda result: result.index)
        results.extend(invalid)
        if single:  # drawn while the table and summary are sent, unless its folder may go
            draw = partial(plots.structure_plots, results[0], results_root / flow_run_id)
            plotting = asyncio.ensure_future(artifacts.publish_plots(flow_name, title, draw))
            if settings.keep_workdir is not KeepWorkdir.always:
                await plotting
        for result in _clean_workdirs(results, paths.work_dir, settings.keep_workdir):
            save_result(results_root, result)
        await links
        if not jobs:
            limits.cancel()
    except AtomforgeError as exc:
        _record_ending(summary, results_root, paths, "Failed", str(exc))
        progress.stop()
        limits.cancel()
        if plotting:
            plotting.cancel()
        await asyncio.gather(progress.creating, links, return_exceptions=True)
        raise
    except BaseException as exc:
        progress.cancel()
        links.cancel()
        limits.cancel()
        if plotting:
            plotting.cancel()
        stop_run_engines(paths)
        ending = (
            "Cancelled"
            if isinstance(exc, asyncio.CancelledError)
            else "Suspended"
            if isinstance(exc, Pause)
            else "Crashed"
        )
        _record_ending(summary, results_root, paths, ending, _describe(exc))
        raise
    ok, message = verdict(results, tolerance)
    summary.n_structures = len(results)
    summary.n_completed = sum(r.ok for r in results)
    summary.result_ids = [r.id for r in results]
    summary.state = "Completed" if ok else "Failed"
    summary.message = message
    summary.finished_at = datetime.now(timezone.utc)
    try:
        save_run(results_root, summary)
    except BaseException:
        if plotting:
            plotting.cancel()
        raise
    return RunOutcome(results, results_root / flow_run_id, progress, ok, message, plotting)


def _settled(future: asyncio.Future) -> asyncio.Future:
    """Return ``future``, whose exception counts as seen even if no one awaits it (a run
    that ends first need not hear of it)."""
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


def _record_ending(
    summary: RunSummary, results_root: Path, paths: RunPaths, state: str, message: str
) -> None:
    """Record a run that ended early (see :func:`record_ending`); never raise: the reason
    it ended is what the caller raises next."""
    try:
        record_ending(summary, results_root, paths, state, message)
    except Exception:  # the log says; the run's own error goes on
        get_run_logger().exception("cannot record how the run ended")
