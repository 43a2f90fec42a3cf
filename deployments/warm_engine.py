"""One flow run in a child forked by the warm executor: what ``python -m prefect.engine`` runs.

:func:`become_client_process` turns the forked child into the process its client would have
started (standard streams, working directory, environment, Prefect settings, default
signal handlers); :func:`run_engine` then runs the ``__main__`` block of
``prefect/engine.py`` (Prefect 3.9): ``configure_from_env`` for the runner's cancel
channel, ``handle_engine_signals``, ``load_flow_run``, ``load_flow``, ``run_flow`` under
``RunMetrics``. A watcher thread sends this process SIGTERM when the client's connection
ends (the client was killed), as the worker's cancel would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from uuid import UUID

from atomforge.deployments.warm_client import send_line


def become_client_process(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Take over the client's streams, working directory and environment, leave the
    executor's process group and signal handlers, and tell the client this pid."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)
    send_line(conn, {"pid": os.getpid()})
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["prefect.engine", *request.get("argv", [])]
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    _stop_with_client(conn)


def _stop_with_client(conn: socket.socket) -> None:
    """Send this process SIGTERM once the client's end of ``conn`` closes (the client
    sends nothing after its request, so any end of the stream is its end)."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1):
                continue
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="warm-client-watch", daemon=True).start()


def run_engine() -> None:
    """Run the flow run ``PREFECT__FLOW_RUN_ID`` (or ``sys.argv[1]``) as Prefect's engine
    module does when run as a program; return None, or raise SystemExit as it exits."""
    from prefect._internal.control_listener import configure_from_env
    from prefect.engine import _drive_run_flow_result, engine_logger, handle_engine_signals

    try:
        flow_run_id = UUID(sys.argv[1] if len(sys.argv) > 1 else os.environ["PREFECT__FLOW_RUN_ID"])
    except Exception:
        engine_logger.error(f"Invalid flow run id. Received arguments: {sys.argv}", exc_info=True)
        sys.exit(1)
    configure_from_env()
    with handle_engine_signals(flow_run_id):
        from prefect._internal.metrics import RunMetrics
        from prefect.flow_engine import flow_run_logger, load_flow, load_flow_run, run_flow

        flow_run = load_flow_run(flow_run_id=flow_run_id)
        run_logger = flow_run_logger(flow_run=flow_run)
        try:
            flow = load_flow(flow_run)
        except Exception:
            run_logger.error(
                "Unexpected exception encountered when trying to load flow", exc_info=True
            )
            raise
        with RunMetrics(flow_run, flow):
            result = run_flow(flow, flow_run=flow_run, error_logger=run_logger)
            _drive_run_flow_result(flow, result)
