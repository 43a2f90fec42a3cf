"""The warm executor: a process that has imported Prefect's engine and atomforge's flows
once, and runs each flow run the service's worker starts in a child forked from it.

``python -m atomforge.deployments.warm_exec SOCKET`` (started by ``atomforge service up``
with the worker's environment) imports what a flow run needs (about 3 s of imports that a
``python -m prefect.engine`` process pays for every run), starting no thread and calling
no API, then listens on the Unix socket ``SOCKET`` (mode 600, same-user peers only).
For each request of :mod:`atomforge.deployments.warm_client` (the command of the pool's
job template) it forks a child that takes over the client's streams, working directory
and environment and runs what ``python -m prefect.engine`` runs
(:mod:`atomforge.deployments.warm_engine`); when the child ends, its exit status goes
back to the client, which exits with it.

A request is refused, and its client runs ``python -m prefect.engine`` itself, when its
``PREFECT_*`` settings differ from this process's (Prefect reads some of them only at
import), while the executor stops, or when atomforge's code changed since it started: it
then ``exec``-s itself anew once its children have ended, so runs never see stale code.
SIGTERM stops it once its children have ended (each child lives as long as its run).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from atomforge.deployments.warm_client import reap_children, recv_request, same_user, send_line
from atomforge.flows.local_server import code_stamp

MODULE = "atomforge.deployments.warm_exec"
REQUEST_TIMEOUT_SECONDS = 5.0
WARM_MODULES = (
    "prefect.engine",
    "prefect.flow_engine",
    "prefect._internal.metrics",
    "prefect._internal.control_listener",
    "prefect.deployments.steps",
    "prefect.utilities.visualization",
    "atomforge.deployments.warm_engine",
    "atomforge.flows.simulate",
    "atomforge.flows.screen",
    "atomforge.flows.workflow",
    "atomforge.flows.inbox",
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "tornado.platform.asyncio",
    "distributed.diagnostics.websocket",
    "distributed.http.health",
    "distributed.http.proxy",
    "distributed.http.statics",
    "distributed.http.scheduler.info",
    "distributed.http.scheduler.json",
    "distributed.http.scheduler.prometheus",
    "distributed.http.worker.prometheus",
    "prometheus_client.core",
    "importlib_metadata",
    "email.policy",
    "rich._emoji_codes",
    "ase.io.extxyz",
    "ase.io.xyz",
    "matplotlib.backends.backend_agg",
    "PIL.PngImagePlugin",
    "PIL.features",
)
"""What a flow run imports (listed from the modules a ``simulate`` run of water imported
in a child): each forked child finds it imported, about 0.3 s sooner."""


@dataclass
class Forked:
    """What :func:`serve` returns in a forked child: its client's connection, request
    and standard streams."""

    conn: socket.socket
    request: dict
    fds: list[int]


def request_settings(env: dict[str, str]) -> dict[str, str]:
    """Return the Prefect settings in ``env``: ``PREFECT_*`` variables, not the per-run
    ``PREFECT__*`` ones the worker adds."""
    return {
        k: v for k, v in env.items() if k.startswith("PREFECT_") and not k.startswith("PREFECT__")
    }


def own_settings() -> dict[str, str]:
    """Return the Prefect settings this process runs with, as a worker passes them to its
    runs (its environment's, and those its Prefect profile sets)."""
    from prefect.settings import get_current_settings

    profile = get_current_settings().to_environment_variables(exclude_unset=True)
    return request_settings(dict(os.environ)) | request_settings(profile)


def complete_models() -> int:
    """Build the validators of the pydantic models left incomplete at import (Prefect's
    client schemas, built on their first use otherwise: in every run); return how many."""
    from pydantic import BaseModel

    built = 0
    seen: set[type] = set()
    waiting: list[type] = [BaseModel]
    while waiting:
        for model in waiting.pop().__subclasses__():
            if model in seen:
                continue
            seen.add(model)
            waiting.append(model)
            if not model.__dict__.get("__pydantic_complete__", True):
                with contextlib.suppress(Exception):
                    built += bool(model.model_rebuild())
    return built


def warm_up() -> None:
    """Import what flow runs use (a failing import is left to the runs, which meet it and
    report it), complete their models and draw a plot; raise RuntimeError if that started
    a thread (a forked child lacks it)."""
    for name in WARM_MODULES:
        try:
            import_module(name)
        except Exception as exc:
            print(f"warm-up: import {name} failed: {type(exc).__name__}: {exc}", flush=True)
    print(f"warm-up: completed {complete_models()} models", flush=True)
    try:
        import_module("atomforge.flows.ui.plots").warm_up_drawing()
    except Exception as exc:  # the runs draw their plots or log why not
        print(f"warm-up: drawing failed: {type(exc).__name__}: {exc}", flush=True)
    if threading.active_count() > 1:
        raise RuntimeError(f"imports started threads: {threading.enumerate()}")


def _listen(path: Path) -> socket.socket:
    """Return a listening Unix socket at ``path`` (replacing a stale file), mode 600."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(128)
    return listener


def _same_user(conn: socket.socket) -> bool:
    """Return whether the peer of ``conn`` runs as this process's user."""
    peer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", peer)[1] == os.getuid()


class Executor:
    """The executor's state: its socket, the children in flight and their clients."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp = code_stamp()
        self.settings = own_settings()
        self.children: dict[int, socket.socket] = {}
        self.stopping = False
        self.stale = False
        self.wakeup_read, self.wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.listener: socket.socket | None = _listen(path)

    def refusal(self, request: dict) -> str | None:
        """Return why ``request`` is refused, or None if it is run here."""
        if self.stopping:
            return "the executor is stopping"
        if self.stale or code_stamp() != self.stamp:
            self.stale = True
            return "atomforge's code changed since the executor started"
        theirs = request_settings(request.get("env", {}))
        if theirs != self.settings:
            names = sorted(set(theirs.items()) ^ set(self.settings.items()))
            return "other Prefect settings: " + ", ".join(sorted({k for k, _ in names}))
        return None

    def reap(self) -> None:
        """Tell the client of each child that ended how it ended."""
        reap_children(self.children)

    def close_listener(self) -> None:
        """Stop taking requests: new clients run the engine themselves."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.path.unlink(missing_ok=True)

    def accept(self) -> Forked | None:
        """Take one request: refuse it, or fork its child; return the child's request
        in the child, None in this process."""
        assert self.listener is not None
        conn, _ = self.listener.accept()
        if not same_user(conn):
            conn.close()
            return None
        conn.settimeout(REQUEST_TIMEOUT_SECONDS)
        try:
            request, fds = recv_request(conn)
        except (OSError, ValueError) as exc:
            print(f"refused a request: {exc}", flush=True)
            conn.close()
            return None
        conn.settimeout(None)
        why = self.refusal(request)
        pid = None
        if why is None:
            try:
                pid = os.fork()
            except OSError as exc:
                why = f"could not fork: {exc}"
        if pid == 0:
            self.forget_in_child()
            return Forked(conn, request, fds)
        if pid is not None:
            self.children[pid] = conn
            run = request["env"].get("PREFECT__FLOW_RUN_ID", "?")
            print(f"flow run {run}: pid {pid}", flush=True)
        else:
            print(f"refused a request: {why}", flush=True)
            with contextlib.suppress(OSError):
                send_line(conn, {"refused": why})
            conn.close()
        for fd in fds:
            os.close(fd)
        return None

    def forget_in_child(self) -> None:
        """Close, in a forked child, what belongs to the executor."""
        signal.set_wakeup_fd(-1)
        if self.listener is not None:
            self.listener.close()
        for conn in self.children.values():
            conn.close()
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)

    def loop(self) -> Forked | None:
        """Serve until stopped (return None) or stale with no child left (``exec`` anew);
        in a forked child, return its request."""
        selector = selectors.DefaultSelector()
        selector.register(self.wakeup_read, selectors.EVENT_READ)
        assert self.listener is not None
        selector.register(self.listener, selectors.EVENT_READ)
        while True:
            self.reap()
            if (self.stopping or self.stale) and self.listener is not None:
                selector.unregister(self.listener)
                self.close_listener()
            if self.listener is None and not self.children:
                return None
            for key, _ in selector.select():
                if key.fileobj == self.wakeup_read:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup_read, 4096)
                elif self.listener is not None:
                    forked = self.accept()
                    if forked is not None:
                        return forked


def serve(path: Path) -> Forked | None:
    """Run the executor on ``path`` until SIGTERM; return None in it, or in a forked
    child its request. When the code changed, this process becomes a new executor."""
    executor = Executor(path)
    signal.set_wakeup_fd(executor.wakeup_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def stop(signum: int, frame: object) -> None:
        executor.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"warm executor ready on {path}, pid {os.getpid()}", flush=True)
    forked = executor.loop()
    if forked is None and executor.stale and not executor.stopping:
        print("atomforge's code changed: starting anew", flush=True)
        os.execv(sys.executable, [sys.executable, "-m", MODULE, str(path)])
    return forked


def main(argv: list[str]) -> int:
    """Run the executor on the socket ``argv[0]``; return its exit code. In a forked child
    this runs the flow run, and ends as the engine does."""
    if len(argv) != 1:
        print(f"usage: python -m {MODULE} SOCKET", file=sys.stderr)
        return 2
    began = time.monotonic()
    warm_up()
    print(f"imports took {time.monotonic() - began:.1f} s", flush=True)
    forked = serve(Path(argv[0]))
    if forked is None:
        print("warm executor stopped", flush=True)
        return 0
    from atomforge.deployments.warm_engine import become_client_process, run_engine

    become_client_process(forked.conn, forked.request, forked.fds)
    run_engine()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
