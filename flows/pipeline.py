"""The shared body of ``simulate`` and ``screen``: validate, then prepare/run/parse per chunk."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from engines.base import JobStatus
from engines.errors import AtomforgeError
from engines.structures import NamedStructure
from flows import artifacts
from flows.hooks import stop_run_engines
from flows.models import (
    RunOptions,
    RunSummary,
    SimulationParameters,
    StructureResult,
    StructureSource,
)
from flows.paths import run_paths
from flows.settings import KeepWorkdir, Settings, get_settings
from flows.store import save_result, save_run
from flows.tasks import (
    Job,
    RunContext,
    make_result,
    parse_results,
    prepare_inputs,
    run_engine,
    validate,
)

CHUNKS_PER_WORKER = 2


def chunk_size(n_structures: int, options: RunOptions, settings: Settings) -> int:
    """Return how many structures one task handles: a few chunks per worker by default."""
    size = options.chunk_size or settings.chunk_size
    if size:
        return size
    return max(1, math.ceil(n_structures / (CHUNKS_PER_WORKER * settings.dask_workers)))


def _unrun_results(
    structures: list[NamedStructure],
    first_index: int,
    params: SimulationParameters,
    run: RunContext,
    status: JobStatus,
) -> list[StructureResult]:
    """Return (and store) results for structures whose chunk never produced any."""
    results = []
    for offset, structure in enumerate(structures):
        index = first_index + offset
        job = Job(index, structure.name, structure.atoms, run.paths.work_dir / f"{index:05d}")
        result = make_result(job, params, run, JobStatus.read(job.directory) or status)
        result.workdir = None
        save_result(run.results_root, result)
        results.append(result)
    return results


def _clean_workdirs(results: list[StructureResult], work_dir: Path, policy: KeepWorkdir) -> None:
    """Remove working directories the keep policy does not keep, and forget them in results."""
    if policy is KeepWorkdir.always:
        return
    for result in results:
        if result.workdir and (policy is KeepWorkdir.never or result.ok):
            shutil.rmtree(result.workdir, ignore_errors=True)
            result.workdir = None
    if policy is KeepWorkdir.never or not any(r.workdir for r in results):
        shutil.rmtree(work_dir, ignore_errors=True)


@dataclass
class RunOutcome:
    """The results of a run (input order), where they are stored, and its progress artifact."""

    results: list[StructureResult]
    results_dir: Path
    progress_id: UUID | None

    def publish(self, key: str, title: str, ranked: list[StructureResult] | None = None) -> None:
        """Publish the run's table, summary and links (``ranked`` orders the table)."""
        rows = self.results if ranked is None else ranked
        artifacts.publish(key, title, rows, self.results_dir, self.progress_id)


def run_structures(
    source: StructureSource, params: SimulationParameters, options: RunOptions, title: str
) -> RunOutcome:
    """Run every structure of ``source`` through the four steps and return the outcome.

    Must be called inside a flow. Each structure's result and a run summary are stored as
    JSON as soon as they are known; a failed chunk yields ``failed`` results, not a crash.
    """
    settings = get_settings()
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id)
    flow_name = context.flow.name
    results_root = settings.resolved_results_root()
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
    )
    save_run(results_root, summary)
    progress_id = None
    try:
        validated = validate(source, params, options.skip_invalid)
        structures = validated.structures
        progress_id = artifacts.start_progress(f"{flow_name}-progress", title)
        run = RunContext(
            flow_run_id, flow_name, paths, results_root, progress_id, total=len(structures)
        )
        size = chunk_size(len(structures), options, settings)
        get_run_logger().info(
            "%d structure(s) in chunks of %d; work dir %s", len(structures), size, paths.work_dir
        )
        chunks = []
        for start in range(0, len(structures), size):
            part = structures[start : start + size]
            prepared = prepare_inputs.submit(part, start, params, run)
            ran = run_engine.submit(prepared, params, run)
            chunks.append((start, part, parse_results.submit(ran, params, run)))
        results: list[StructureResult] = []
        for start, part, future in chunks:
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                failed = JobStatus("failed", f"{type(outcome).__name__}: {outcome}")
                outcome = _unrun_results(part, start, params, run, failed)
            results.extend(outcome)
        for structure, message in validated.rejected:
            invalid = JobStatus("invalid", message)
            results.extend(_unrun_results([structure], len(results), params, run, invalid))
        _clean_workdirs(results, paths.work_dir, settings.keep_workdir)
        for result in results:
            save_result(results_root, result)
    except AtomforgeError as exc:
        summary.state, summary.message = "Failed", str(exc)
        summary.finished_at = datetime.now(timezone.utc)
        save_run(results_root, summary)
        raise
    except BaseException:
        stop_run_engines(paths)
        raise
    summary.n_structures = len(results)
    summary.n_completed = sum(r.ok for r in results)
    summary.result_ids = [r.id for r in results]
    summary.state = "Completed" if summary.n_completed == len(results) else "Failed"
    summary.message = f"{summary.n_completed} of {len(results)} completed"
    summary.finished_at = datetime.now(timezone.utc)
    save_run(results_root, summary)
    return RunOutcome(results, results_root / flow_run_id, progress_id)
