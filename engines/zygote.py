"""The runner zygote: a process that has imported the ASE runner once and forks each
chunk's runner from itself, so a chunk no longer pays Python's, ASE's and its
calculator's imports.

``python -m atomforge.engines.zygote FD`` is started by :mod:`atomforge.engines.warm_runner`
(one per process that runs engines, with that process's environment; or forked from a
warm process that runs one flow, calling :func:`main` itself) with one end of a Unix
socket pair as ``FD``: its control socket. It imports :data:`RUNNER_MODULE`, then
serves requests sent with :func:`~atomforge.deployments.warm_client.send_request`: JSON
``{"args", "cwd", "env"}`` carrying two descriptors, the request's own socket and the log
file. Before the first chunk of an engine it imports that engine's calculator modules
(``modules``, read from the chunk's first ``job.json``; a module that fails to import is
left to the runner, which meets it as a cold one would). For each request it forks a child
that calls ``setsid()``, dies with the zygote (``PR_SET_PDEATHSIG``), takes the log file
as its standard output and error, the working directory and the environment, and runs
the runner's ``main(args)``. The request's socket gets ``{"pid": N}`` once the child
leads its session, then how the child ended (``{"exit": CODE}`` or ``{"signal": N}``),
or ``{"refused": WHY}`` when no child was forked (the client then starts the runner
itself). ``{"warm": ENGINE}`` imports an engine's calculator modules ahead of its first
chunk.

It is single-threaded, so forking is safe. When the control socket closes (its owner
exited or was killed with ``kill -9``), it kills the sessions of the children still
running and exits; ``{"retire": true}`` makes it stop taking requests and exit once its
children have ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from importlib import import_module
from pathlib import Path
from typing import NoReturn

from atomforge.deployments.warm_client import reap_children, recv_request, send_line
from atomforge.engines import reaper

MODULE = "atomforge.engines.zygote"
RUNNER_MODULE = "atomforge.engines.ase_runner"
PR_SET_PDEATHSIG = 1
ENGINE_NAME_FILE = "job.json"
SESSION_WAIT_SECONDS = 5.0


def engine_of(directory: str) -> str | None:
    """Return the engine named by the job in ``directory``, or None if it names none."""
    try:
        job = json.loads((Path(directory) / ENGINE_NAME_FILE).read_text())
        return str(job["parameters"]["engine"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _await_own_session(pid: int, timeout: float = SESSION_WAIT_SECONDS) -> None:
    """Return once the forked child ``pid`` leads a session of its own (its first act),
    so the pid it is reported by is also its session's id; or once it has ended, or
    after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = reaper.stat_fields(pid)
        if fields is None or int(fields[3]) == pid or fields[0] in "ZX":
            return
        time.sleep(0.0005)


class Zygote:
    """The zygote's state: its control socket, the runner module, children in flight."""

    def __init__(self, control: socket.socket, modules: dict[str, list[str]]) -> None:
        self.control = control
        self.modules = modules
        self.warmed: set[str] = set()
        self.children: dict[int, socket.socket] = {}
        self.retiring = False
        self.buffer = bytearray()
        self.runner = None
        self.broken: str | None = None
        self.wakeup_read, self.wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def warm_up(self) -> None:
        """Import the runner module; a failure makes every request refused (its runners
        then start cold and meet the failure themselves)."""
        try:
            self.runner = import_module(RUNNER_MODULE)
        except Exception as exc:
            self.broken = f"import {RUNNER_MODULE} failed: {type(exc).__name__}: {exc}"

    def warm_engine(self, engine: str | None) -> None:
        """Import the calculator modules of ``engine`` the first time it comes."""
        if engine is None or engine in self.warmed:
            return
        self.warmed.add(engine)
        for name in self.modules.get(engine, []):
            with contextlib.suppress(Exception):
                import_module(name)

    def refusal(self) -> str | None:
        """Return why no runner can be forked now, or None."""
        if self.broken:
            return self.broken
        if threading.active_count() > 1:
            return "the zygote's imports started threads"
        return None

    def serve_request(self) -> bool:
        """Take one request from the control socket and fork its runner; return False
        when the control socket has closed. Returns in the forked child only by exiting."""
        try:
            request, fds = recv_request(self.control, 2)
        except (OSError, ValueError):
            return False
        conn = socket.socket(fileno=fds[0])
        log_fd = fds[1]
        if request.get("retire") or request.get("warm"):
            self.retiring = self.retiring or bool(request.get("retire"))
            self.warm_engine(request.get("warm"))
            conn.close()
            os.close(log_fd)
            return True
        args = [str(a) for a in request["args"]]
        self.warm_engine(engine_of(args[0]) if args else None)
        why = self.refusal()
        pid = None
        zygote_pid = os.getpid()
        if why is None:
            try:
                pid = os.fork()
            except OSError as exc:
                why = f"could not fork: {exc}"
        if pid == 0:
            self.become_runner(conn, log_fd, request, args, zygote_pid)
        os.close(log_fd)
        if pid is None:
            with contextlib.suppress(OSError):
                send_line(conn, {"refused": why})
            conn.close()
            return True
        self.children[pid] = conn
        _await_own_session(pid)
        try:
            send_line(conn, {"pid": pid})
        except OSError:
            self.kill_children([pid])  # its client went away: nobody would wait for it
        return True

    def kill_children(self, pids: list[int]) -> None:
        """Kill the children ``pids`` and their sessions (SIGKILL)."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reaper.reap(pids)

    def become_runner(
        self, conn: socket.socket, log_fd: int, request: dict, args: list[str], zygote_pid: int
    ) -> NoReturn:
        """Turn this forked child into the chunk's runner process and exit with its code
        (a KeyboardInterrupt ends it by SIGINT, as it ends ``python``)."""
        code: int = 1
        try:
            os.setsid()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != zygote_pid:
                os._exit(1)
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.control.close()
            conn.close()
            for other in self.children.values():
                other.close()
            os.close(self.wakeup_read)
            os.close(self.wakeup_write)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(null)
            os.close(log_fd)
            sys.stdout = io.TextIOWrapper(
                io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True
            )
            sys.stderr = io.TextIOWrapper(
                io.FileIO(2, "w", closefd=False),
                encoding="utf-8",
                errors="backslashreplace",
                write_through=True,
            )
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.path[0] = os.getcwd()
            sys.argv = [self.runner.__file__, *args]
            code = self.runner.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            traceback.print_exc()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)

    def reap(self) -> None:
        """Tell the client of each child that ended how it ended."""
        reap_children(self.children)

    def loop(self) -> None:
        """Serve until the control socket closes (then kill the children's sessions) or,
        retiring, until no child is left."""
        selector = selectors.DefaultSelector()
        selector.register(self.wakeup_read, selectors.EVENT_READ)
        selector.register(self.control, selectors.EVENT_READ)
        while True:
            self.reap()
            if self.retiring and not self.children:
                return
            for key, _ in selector.select():
                if key.fileobj == self.wakeup_read:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup_read, 4096)
                elif not self.serve_request():
                    self.kill_children(list(self.children))
                    self.reap()
                    return


def main(argv: list[str]) -> int:
    """Serve on the control socket whose descriptor is ``argv[0]``; ``argv[1]`` is the JSON
    map of engine names to calculator modules. Returns 0 once the owner has gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    control = socket.socket(fileno=int(argv[0]))
    zygote = Zygote(control, json.loads(argv[1]) if len(argv) > 1 else {})
    signal.set_wakeup_fd(zygote.wakeup_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    zygote.warm_up()
    zygote.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
