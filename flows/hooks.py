"""Flow state hooks: on cancellation or crash, stop every engine of the run and tidy up.

Hooks may run in the flow's own process or in the worker that supervised it, so they find
the run's engines through the file system (pid records and a stop file), not memory. They
also record how the run ended: ``run.json`` in its final state (Cancelled or Crashed) and a
result document for every structure (see :func:`settle_unfinished`). A run of this process
that Ctrl-C (:mod:`atomforge.flows.interrupt`) stopped crashes in Prefect's eyes: it is
recorded Cancelled, and its Prefect state set so.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

from prefect.logging import get_logger

from atomforge.engines.process import kill_recorded
from atomforge.engines.registry import make_parameters
from atomforge.flows import interrupt
from atomforge.flows.jobs import RunContext
from atomforge.flows.models import RunSummary
from atomforge.flows.paths import RunPaths, run_paths
from atomforge.flows.settings import KeepWorkdir, get_settings
from atomforge.flows.store.documents import settle_unfinished
from atomforge.flows.store.files import iter_results, load_run, save_run

logger = get_logger("atomforge.hooks")


def stop_run_engines(paths: RunPaths) -> list[int]:
    """Tell every engine of a run to stop and kill those on this host; return killed pids."""
    paths.control_dir.mkdir(parents=True, exist_ok=True)
    paths.stop_file.touch()
    return kill_recorded(paths.pid_dir)


def begin_attempt(paths: RunPaths) -> list[int]:
    """Clear what an earlier attempt of the same flow run left (a retry): kill its engines
    still recorded on this host, then remove its stop file; return the killed pids."""
    killed = kill_recorded(paths.pid_dir)
    paths.stop_file.unlink(missing_ok=True)
    return killed


def ending_name(state) -> str:
    """Return the final state a cancelling or crashing run ends in: Cancelled, Crashed."""
    if state.is_cancelling() or state.is_cancelled():
        return "Cancelled"
    return "Crashed" if state.is_crashed() else state.name


def record_ending(
    summary: RunSummary, results_root: Path, paths: RunPaths, state: str, message: str
) -> None:
    """Store every structure's document (settling the unfinished ones) and ``summary`` in
    its final ``state``, with ``message`` and the counts."""
    run = RunContext(
        summary.flow_run_id,
        summary.flow_name,
        paths,
        results_root,
        summary.workflow_run_id,
        summary.step,
    )
    try:
        params = make_parameters(**summary.parameters)
    except Exception:  # without them completed structures are only 'stopped'
        params = None
    settle_unfinished(paths, run, params)
    results = sorted(iter_results(results_root, summary.flow_run_id), key=lambda r: r.index)
    summary.n_structures = len(results)
    summary.n_completed = sum(result.ok for result in results)
    summary.result_ids = [result.id for result in results]
    counts = f"{summary.n_completed} of {summary.n_structures} completed"
    summary.state = state
    summary.message = f"{message}; {counts}" if message else counts
    summary.finished_at = datetime.now(timezone.utc)
    save_run(results_root, summary)


def stop_engines(flow, flow_run, state) -> None:
    """Stop the engines of ``flow_run``, record how it ended, and keep or clean its workdir."""
    settings = get_settings()
    run_dir = (flow_run.parameters.get("options") or {}).get("run_dir")
    try:
        paths = run_paths(settings, str(flow_run.id), run_dir)
    except ValueError:
        paths = run_paths(settings, str(flow_run.id))
    killed = stop_run_engines(paths)
    why = interrupt.reason()
    ending = "Cancelled" if why else ending_name(state)
    logger.warning(
        "flow run %s %s: stopped %d engine process(es) %s",
        flow_run.name,
        ending.lower(),
        len(killed),
        killed,
    )
    results_root = settings.resolved_results_root()
    summary = load_run(results_root, str(flow_run.id))
    if summary is not None:
        try:
            record_ending(summary, results_root, paths, ending, why or state.message or "")
        except Exception:  # a hook must not fail; the log says what went wrong
            logger.exception("flow run %s: cannot record how it ended", flow_run.name)
    if why:
        try:
            interrupt.mark_cancelled(flow_run)
        except Exception:  # the run stays Crashed in Prefect; the log says why
            logger.exception("flow run %s: cannot mark it cancelled", flow_run.name)
    if settings.keep_workdir is KeepWorkdir.never:
        shutil.rmtree(paths.work_dir, ignore_errors=True)
