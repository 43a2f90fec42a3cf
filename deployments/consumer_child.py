"""One flow run in a child forked by the warm consumer (:mod:`atomforge.deployments.consumer`).

:func:`run_flow_run` makes the child the run's own process (a process group of its own,
default signal handlers, ``PREFECT__FLOW_RUN_ID`` set) and runs the flow as
``python -m prefect.engine`` would once it has read the run and loaded its flow:
``run_flow`` under ``handle_engine_signals``. A thread reads the consumer's pipe: a
``c`` there is a cancellation of the run, delivered as Prefect's runner delivers one
(the control intent ``cancel``, then SIGTERM), so that the flow engine stops its tasks,
ends the run Cancelled and runs the flow's cancellation hooks (which stop its engines).
An ``s`` says someone suspended the run: the flow engine is told as Prefect's suspension
observer would tell it, and suspends the run at its next step (the consumer watches for
suspensions, so the child starts no observer of its own). The end of the pipe (the
consumer died) changes nothing: the run goes on to its end.

:func:`run_end_hooks` runs the flow's crash or cancellation hooks for a run whose child
died before it ended (the consumer has set its final state).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator
from contextlib import contextmanager

from prefect.flows import Flow

from atomforge.flows.local_server import send_held_telemetry
from atomforge.flows.runner_start import start_runner_of_run

CANCEL = b"c"
SUSPEND = b"s"
SUSPENSION_RETRY_SECONDS = 0.1
"""How often a suspension waits for the flow engine to set up its run."""
SUSPENSION_WAIT_SECONDS = 60.0
"""How long it waits for that at most (the run may have ended meanwhile)."""
DRAIN_SECONDS = 20.0
"""How long a child waits at its end for its logs and events to reach the server."""


def _watch_consumer(fd: int, run_id: str) -> None:
    """Start a thread that delivers to this process the cancellation or suspension of
    its run that the consumer writes to ``fd``."""

    def watch() -> None:
        from prefect._internal import control_listener

        while received := _read(fd):
            if received == CANCEL:
                control_listener._set_intent("cancel")  # what the runner's cancel commits
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if received == SUSPEND:
                _request_suspension(run_id)

    threading.Thread(target=watch, name="consumer-watch", daemon=True).start()


def _read(fd: int) -> bytes:
    """Return the next byte from ``fd``, or nothing once the pipe is closed."""
    try:
        return os.read(fd, 1)
    except OSError:
        return b""


def _request_suspension(run_id: str) -> None:
    """Tell the flow engine that the run ``run_id`` is suspended (its Suspended state, read
    from the server), waiting up to :data:`SUSPENSION_WAIT_SECONDS` for the engine to
    have set up its run; a failure is printed (the run then goes on to its end)."""
    from uuid import UUID

    from prefect._flow_run_suspension import mark_flow_run_suspension_requested
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        deadline = time.monotonic() + SUSPENSION_WAIT_SECONDS
        while state is not None and not mark_flow_run_suspension_requested(UUID(run_id), state):
            if time.monotonic() > deadline:
                print(f"flow run {run_id}: suspension not delivered: no run here", flush=True)
                return
            time.sleep(SUSPENSION_RETRY_SECONDS)
    except Exception as exc:  # the consumer's pipe stays read: a cancel still arrives
        print(f"flow run {run_id}: suspension not delivered: {exc}", file=sys.stderr, flush=True)


@contextmanager
def _suspension_watched_by_consumer(
    flow_run_id: object, request: object
) -> Generator[None, None, None]:
    """Stand in for Prefect's per-run suspension observer: the consumer watches."""
    yield


def _become_run_process(run: dict) -> None:
    """Leave the consumer's process group and signal handlers; set the run's id in the
    environment. The run keeps the consumer's environment and Prefect's settings as the
    consumer read them when it started (a profile or ``prefect.toml`` changed since
    reaches the runs once the consumer starts anew, at ``atomforge service up`` after
    ``down``, or when atomforge's code changed)."""
    os.setpgid(0, 0)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ["PREFECT__FLOW_RUN_ID"] = run["id"]


def _exit_code(call: Callable[[], None]) -> int:
    """Return the exit code of ``call()``: 0, a SystemExit's code, or 1 (with the
    traceback on standard error) for any other exception. Then send what Prefect's
    background services still hold (the run's logs and events: an interpreter's exit
    would, and this process ends with ``os._exit``) and flush the standard streams."""
    try:
        call()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        send_held_telemetry(DRAIN_SECONDS)
        sys.stdout.flush()
        sys.stderr.flush()


def run_flow_run(run: dict, flow: Flow, pipe_fd: int) -> int:
    """Run the flow run ``run`` (the API's JSON of it, in Pending) with ``flow`` in this
    forked child; return the exit code ``python -m prefect.engine`` would end with."""

    def run_it() -> None:
        _become_run_process(run)
        start_runner_of_run(run.get("parameters") or {}, fork=True)  # before any thread
        _watch_consumer(pipe_fd, run["id"])
        from prefect import flow_engine
        from prefect.client.schemas.objects import FlowRun
        from prefect.engine import _drive_run_flow_result, handle_engine_signals
        from prefect.flow_engine import run_flow

        flow_engine.observe_flow_run_suspension = _suspension_watched_by_consumer
        flow_run = FlowRun.model_validate(run)
        with handle_engine_signals(flow_run.id):
            _drive_run_flow_result(flow, run_flow(flow, flow_run=flow_run))

    return _exit_code(run_it)


def run_end_hooks(run_id: str, flow: Flow) -> int:
    """Run ``flow``'s hooks for the final state of the run ``run_id`` (Crashed: its crash
    hooks; Cancelled: its cancellation hooks); return an exit code."""

    def run_them() -> None:
        _become_run_process({"id": run_id})
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(run_id)
        state = flow_run.state
        if state is None or not (state.is_crashed() or state.is_cancelled()):
            return
        hooks = flow.on_crashed_hooks if state.is_crashed() else flow.on_cancellation_hooks
        for hook in hooks:
            hook(flow, flow_run, state)

    return _exit_code(run_them)
