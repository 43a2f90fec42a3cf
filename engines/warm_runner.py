"""Warm ASE runners: a chunk's ``python -m atomforge.engines.ase_runner DIR...`` forked
from this process's runner zygote (:mod:`atomforge.engines.zygote`) instead of started
cold, so it does not pay Python's, ASE's and its calculator's imports (about 0.75 s a
chunk for tblite on two cores).

The runner is still a process of its own in a session of its own, with the log file as
its output: :func:`atomforge.engines.process.run_process` times it out, stops it and
kills its tree as it does a cold one, records it for cancellation hooks and tells the
reaper its session. It dies with the zygote (``PR_SET_PDEATHSIG``), and the zygote kills
its runners and exits when this process goes, also on ``kill -9``.

The zygote is started on the first chunk, or earlier by :func:`prewarm` (a run that
knows it has structures to compute), with this process's environment and the chunk's
(``OMP_NUM_THREADS``...), which libraries read as they load; a chunk with another
environment gets a new zygote (the old one ends once its runners have). A warm process
forked to run one flow (a request's child in the service's consumer, a command's child
in the local server) may fork the zygote from itself instead (:func:`prewarm` with
``fork``), which spares it Python's start and ASE's imports, about 0.9 s of CPU; its
runners then also inherit that process's logging and warnings set-up.
Anything the zygote cannot do (``ATOMFORGE_WARM_RUNNERS=false``, another command, a
failed import in the zygote, a zygote that died) falls back to the cold start.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Mapping

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atomforge.deployments.warm_client import read_line, send_request
from atomforge.engines import zygote

DEFAULT_MODULES = {
    "tblite": ["tblite.ase"],
    "emt": ["ase.calculators.emt"],
    "chgnet": ["chgnet.model.dynamics", "pymatgen.io.ase"],
    "mace": ["mace.calculators"],
}


class WarmRunnerSettings(BaseSettings):
    """``ATOMFORGE_WARM_RUNNERS`` and ``ATOMFORGE_WARM_RUNNER_MODULES``."""

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_")

    warm_runners: bool = Field(
        True, description="Fork ASE runners from a warm zygote instead of starting Python."
    )
    warm_runner_modules: dict[str, list[str]] = Field(
        default_factory=lambda: dict(DEFAULT_MODULES),
        description="Modules the zygote imports before the first chunk of each engine "
        "(JSON; a module that does not import is left to the runner).",
    )


def runner_args(argv: list[str]) -> list[str] | None:
    """Return the runner's arguments if ``argv`` starts the ASE runner with this Python
    (``python [-u] -m atomforge.engines.ase_runner ARGS``), else None."""
    rest = argv[1:]
    if not argv or argv[0] != sys.executable:
        return None
    if rest[:1] == ["-u"]:
        rest = rest[1:]
    if rest[:2] != ["-m", zygote.RUNNER_MODULE]:
        return None
    return rest[2:]


class WarmProcess:
    """A runner forked by the zygote: ``pid``, ``returncode`` and ``Popen``'s
    :meth:`poll` and :meth:`wait`; :meth:`fileno` becomes readable once it has ended."""

    def __init__(self, pid: int, conn: socket.socket, buffer: bytearray) -> None:
        self.pid = pid
        self.conn = conn
        self.buffer = buffer
        self.returncode: int | None = None
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None  # it has already ended and been reaped

    def fileno(self) -> int:
        """Return the descriptor that becomes readable once the runner has ended."""
        return self.conn.fileno()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: for ever) for the runner to end; return
        its return code (minus the signal that ended it), or None if it still runs."""
        if self.returncode is not None:
            return self.returncode
        if b"\n" not in self.buffer and not select.select([self.conn], [], [], timeout)[0]:
            return None
        message = read_line(self.conn, self.buffer)
        if message is None:
            # The zygote died, and its runner gets SIGKILL with it (PR_SET_PDEATHSIG).
            self._kill_and_wait()
            message = {"signal": signal.SIGKILL}
        self.returncode = -int(message["signal"]) if "signal" in message else message["exit"]
        self.close()
        return self.returncode

    def poll(self) -> int | None:
        """Return the return code if the runner has ended, else None."""
        return self.wait(0)

    def _kill_and_wait(self) -> None:
        """Kill the runner through its pidfd (never another process) and wait for its end."""
        if self.pidfd is None:
            return
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        select.select([self.pidfd], [], [], 10.0)

    def close(self) -> None:
        """Close the runner's socket and pidfd."""
        self.conn.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


THREAD_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
"""What numerical libraries (NumPy's and SciPy's OpenBLAS, OpenMP, MKL) read for their
threads as they load."""


def _threads(env: Mapping[str, str]) -> tuple[str | None, ...]:
    """Return the values of :data:`THREAD_VARIABLES` in ``env`` (None where unset)."""
    return tuple(env.get(name) for name in THREAD_VARIABLES)


class _Forked:
    """A zygote forked from this process (:func:`_fork_zygote`), polled as ``Popen`` is."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Return its exit code once it has ended (0 when someone else reaped it), else None."""
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = self.pid, 0
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _fork_zygote(control_fd: int, args: list[str], env: dict[str, str]) -> _Forked:
    """Fork the zygote from this process: in a session of its own, with the default
    action for each signal its owner handled in Python, ``control_fd`` as its only
    descriptor besides ``/dev/null`` as its standard streams, environment ``env`` and
    command-line arguments ``args``. What it inherits is frozen, so the cyclic collector
    frees none of the owner's objects (one holding a descriptor would close a number the
    zygote reuses); the frames that hold the rest never return. Returns the forked
    zygote."""
    with warnings.catch_warnings():  # Python 3.12+ warns of the owner's threads: vouched for
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 1
    try:
        signal.set_wakeup_fd(-1)  # the owner's: its number is about to be closed or reused
        for signum in signal.valid_signals():
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
        gc.freeze()
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd > 2 and fd != control_fd:
                with contextlib.suppress(OSError):
                    os.close(fd)
        os.environ.clear()
        os.environ.update(env)
        code = zygote.main(args)
    finally:
        os._exit(code)


class _Zygote:
    """One zygote of this process: its control socket and the environment it has."""

    def __init__(self, env: dict[str, str], modules: dict[str, list[str]], fork: bool) -> None:
        self.env = env
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [str(theirs.fileno()), json.dumps(modules)]
        try:
            self.proc: subprocess.Popen | _Forked
            if fork:
                self.proc = _fork_zygote(theirs.fileno(), args, env)
            else:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", zygote.MODULE, *args],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=[theirs.fileno()],
                    start_new_session=True,
                    env=env,
                )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours
        self.lock = threading.Lock()

    def alive(self) -> bool:
        """Return whether the zygote still runs."""
        return self.proc.poll() is None

    def request(self, message: dict, fds: list[int]) -> bool:
        """Send ``message`` with ``fds``; return False if the zygote is gone."""
        with self.lock:
            try:
                send_request(self.control, message, fds)
            except OSError:
                return False
        return True

    def retire(self) -> None:
        """Ask the zygote to end once its runners have ended."""
        self.tell({"retire": True})

    def warm(self, engine: str) -> None:
        """Ask the zygote to import ``engine``'s calculator modules now."""
        self.tell({"warm": engine})

    def tell(self, message: dict) -> None:
        """Send ``message``, a request that forks nothing (its descriptors are dummies)."""
        null = os.open(os.devnull, os.O_WRONLY)
        ours, theirs = socket.socketpair()
        try:
            self.request(message, [theirs.fileno(), null])
        finally:
            os.close(null)
            ours.close()
            theirs.close()


class _Zygotes:
    """This process's zygote (started on first use; again in a forked child) and the
    retired ones still finishing their runners."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner = os.getpid()
        self.current: _Zygote | None = None
        self.retired: list[_Zygote] = []
        os.register_at_fork(after_in_child=self.forget)

    def forget(self) -> None:
        """In a forked child: drop the parent's zygotes (their sockets are the parent's)."""
        for one in [self.current, *self.retired]:
            if one is not None:
                with contextlib.suppress(OSError):
                    one.control.close()
        self.current, self.retired, self.owner = None, [], os.getpid()
        self.lock = threading.Lock()

    def get(
        self, env: dict[str, str], modules: dict[str, list[str]], fork: bool = False
    ) -> _Zygote:
        """Return a live zygote with environment ``env``, starting one if needed (with
        ``fork``, forked from this process where ``env`` gives the numerical libraries
        it has loaded the threads it loaded them with, see :data:`THREAD_VARIABLES`)."""
        with self.lock:
            self.retired = [one for one in self.retired if one.alive()]
            current = self.current
            if current is not None and current.alive() and current.env == env:
                return current
            if current is not None:
                current.retire()
                self.retired.append(current)
            forked = fork and _threads(env) == _LOADED_THREADS
            try:
                self.current = _Zygote(env, modules, forked)
            except Exception:  # a fork refused: start it anew
                if not forked:
                    raise
                self.current = _Zygote(env, modules, False)
            return self.current


_ZYGOTES = _Zygotes()
_LOADED_THREADS = _threads(os.environ)
"""The thread variables of this process's environment as it started (its libraries
loaded with them)."""


def prewarm(argv: list[str], env: dict[str, str], engine: str, fork: bool = False) -> None:
    """Start the zygote that the runner ``argv`` with environment ``env`` (complete) is
    to be forked from, unless warm runners are off, ``argv`` is another command, or that
    zygote runs already, and have it import ``engine``'s calculator modules: its imports
    then overlap what a run does before its first chunk. With ``fork`` (the caller, on
    its main thread, vouches that its other threads hold no lock: it has none, or they
    wait reading a socket), the zygote is forked from this process unless ``env`` gives
    the numerical libraries other threads than this process loaded them with
    (:data:`THREAD_VARIABLES`). A zygote that cannot start is left to
    :func:`start_warm` to find."""
    if runner_args(argv) is not None and (one := _zygote(env, fork)):
        one.warm(engine)


def _zygote(env: dict[str, str], fork: bool = False) -> _Zygote | None:
    """Return this process's live zygote with environment ``env``, starting one if needed
    (forked from this process with ``fork``, see :func:`prewarm`); None when warm
    runners are off or it cannot start."""
    settings = WarmRunnerSettings()
    if not settings.warm_runners:
        return None
    try:
        return _ZYGOTES.get(env, settings.warm_runner_modules, fork)
    except OSError:
        return None


def start_warm(
    argv: list[str], *, cwd: str, env: dict[str, str], log_fd: int
) -> WarmProcess | None:
    """Fork the runner ``argv`` asks for from the zygote, in ``cwd`` with environment
    ``env`` (complete) and output to ``log_fd``; return it, or None where it must be
    started cold (warm runners off, another command, the zygote refused or is gone)."""
    args = runner_args(argv)
    one = _zygote(env) if args is not None else None
    if one is None:
        return None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sent = one.request({"args": args, "cwd": cwd, "env": env}, [theirs.fileno(), log_fd])
    finally:
        theirs.close()
    buffer = bytearray()
    answer = read_line(ours, buffer) if sent else None
    if answer is None or "pid" not in answer:
        ours.close()
        return None
    return WarmProcess(int(answer["pid"]), ours, buffer)
