"""Flow state hooks: on cancellation or crash, stop every engine of the run and tidy up.

Hooks may run in the flow's own process or in the worker that supervised it, so they find
the run's engines through the file system (pid records and a stop file), not memory.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

from prefect.logging import get_logger

from atomforge.engines.process import kill_recorded
from atomforge.flows.paths import RunPaths, run_paths
from atomforge.flows.settings import KeepWorkdir, get_settings
from atomforge.flows.store.files import load_run, save_run

logger = get_logger("atomforge.hooks")


def stop_run_engines(paths: RunPaths) -> list[int]:
    """Tell every engine of a run to stop and kill those on this host; return killed pids."""
    paths.control_dir.mkdir(parents=True, exist_ok=True)
    paths.stop_file.touch()
    return kill_recorded(paths.pid_dir)


def stop_engines(flow, flow_run, state) -> None:
    """Stop the engines of ``flow_run``, record how it ended, and keep or clean its workdir."""
    settings = get_settings()
    run_dir = (flow_run.parameters.get("options") or {}).get("run_dir")
    try:
        paths = run_paths(settings, str(flow_run.id), run_dir)
    except ValueError:
        paths = run_paths(settings, str(flow_run.id))
    killed = stop_run_engines(paths)
    logger.warning(
        "flow run %s %s: stopped %d engine process(es) %s",
        flow_run.name,
        state.name.lower(),
        len(killed),
        killed,
    )
    results_root = settings.resolved_results_root()
    summary = load_run(results_root, str(flow_run.id))
    if summary is not None:
        summary.state = state.name
        summary.message = state.message or ""
        summary.finished_at = datetime.now(timezone.utc)
        save_run(results_root, summary)
    if settings.keep_workdir is KeepWorkdir.never:
        shutil.rmtree(paths.work_dir, ignore_errors=True)
