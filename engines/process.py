"""Start engine processes in their own session, stream their output, and kill whole trees.

Every process started here records itself in a pid directory (a JSON file per process),
so that a cancellation hook running in another process can find and stop it, and it polls
a stop file so that a stop also works where that hook cannot reach the host. Its session
is also told to this process's reaper (:mod:`atomforge.engines.reaper`), which kills what
is left of it if this process dies first.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from atomforge.engines import reaper
from atomforge.engines.warm_runner import WarmProcess, start_warm

POLL_SECONDS = 0.1
KILL_GRACE_SECONDS = 3.0


@functools.cache
def _dies_with_owner() -> tuple[str, ...]:
    """Return the command prefix that makes a process get SIGKILL when the thread that
    started it dies (``setpriv --pdeathsig``, util-linux), or nothing where there is none.

    Engines run in sessions of their own, so that their whole tree can be killed; without
    this, a ``kill -9`` of the flow's process (or the OOM killer) would leave them running.
    """
    setpriv = shutil.which("setpriv")
    return (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()


class _Reaper:
    """This process's reaper, started beside the first engine it runs (and again in a
    forked child): :meth:`tell` hands it ``+SID`` or ``-SID``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.proc: subprocess.Popen | None = None

    def tell(self, line: str) -> None:
        """Send ``line`` to the reaper, starting it first if this process has none."""
        with self.lock:
            if self.owner != os.getpid() or self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", reaper.MODULE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    text=True,
                )
                self.owner = os.getpid()
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(f"{line}\n")
                self.proc.stdin.flush()


_REAPER = _Reaper()


@dataclass
class ProcessOutcome:
    """How an engine process ended."""

    returncode: int
    wall_seconds: float
    timed_out: bool = False
    stopped: bool = False


def _session_members(sid: int) -> list[psutil.Process]:
    """Return every live process whose session id is ``sid``."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def kill_tree(pid: int, *, grace: float = KILL_GRACE_SECONDS) -> list[int]:
    """Stop ``pid``, its descendants and its whole session: SIGTERM, wait, then SIGKILL.

    Returns the pids that were signalled. The session sweep catches processes that left
    the tree (daemonized helpers, MPI ranks in their own process groups).
    """
    try:
        root = psutil.Process(pid)
        sid = os.getsid(pid)
    except (psutil.NoSuchProcess, ProcessLookupError):
        return []
    targets = {root.pid: root}
    with contextlib.suppress(psutil.NoSuchProcess):
        targets.update({child.pid: child for child in root.children(recursive=True)})
    if sid == pid:
        targets.update({proc.pid: proc for proc in _session_members(sid)})
    targets.pop(os.getpid(), None)
    for proc in targets.values():
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(list(targets.values()), timeout=grace)
    leftovers = alive + (_session_members(sid) if sid == pid else [])
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(leftovers, timeout=grace)
    return sorted(targets)


def kill_recorded(pid_dir: Path) -> list[int]:
    """Kill every process tree recorded in ``pid_dir`` on this host; return the killed pids."""
    killed: list[int] = []
    host = socket.gethostname()
    for record_path in sorted(pid_dir.glob("*.json")) if pid_dir.is_dir() else []:
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("host") != host:
            continue
        try:
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["create_time"]) > 1.0:
                continue
        except psutil.NoSuchProcess:
            record_path.unlink(missing_ok=True)
            continue
        killed.extend(kill_tree(record["pid"]))
        record_path.unlink(missing_ok=True)
    return killed


def _record(proc: subprocess.Popen | WarmProcess, argv: Sequence[str], pid_dir: Path) -> Path:
    """Write a JSON record of ``proc`` into ``pid_dir`` and return its path."""
    pid_dir.mkdir(parents=True, exist_ok=True)
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = 0.0  # already gone: the record matches no process
    record = {
        "pid": proc.pid,
        "host": socket.gethostname(),
        "create_time": create_time,
        "argv": list(argv),
    }
    path = pid_dir / f"{proc.pid}.json"
    path.write_text(json.dumps(record))
    return path


class _LogTail:
    """Hands what a process appends to its log file to ``sink``, as decoded text.

    The engine writes straight into the file: a pipe read by a Python thread costs a
    wake-up and the GIL for every line a chatty engine prints (xtb prints hundreds per
    structure), which slowed whole screens by a fifth.
    """

    def __init__(self, path: Path, offset: int, sink: Callable[[str], None]) -> None:
        self.file = path.open("rb")
        self.file.seek(offset)
        self.sink = sink
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self) -> None:
        """Pass on whatever was appended since the last read."""
        if block := self.file.read():
            self.sink(self.decoder.decode(block))

    def close(self) -> None:
        """Pass on the rest of the output and close the file."""
        self.read()
        if tail := self.decoder.decode(b"", final=True):
            self.sink(tail)
        self.file.close()


class LineSplitter:
    """Turns output text that arrives in arbitrary blocks into whole lines for ``on_line``."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.partial = ""

    def __call__(self, text: str) -> None:
        """Take a block of output; pass on every line it completes (without the newline)."""
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.on_line(line)

    def close(self) -> None:
        """Pass on a last line that had no newline."""
        if self.partial:
            self.on_line(self.partial)
            self.partial = ""


def _exit_handle(proc: subprocess.Popen | WarmProcess) -> int | None:
    """Return a pidfd that becomes readable when ``proc`` exits, or None where there is none
    (a warm runner is waited for through its zygote's socket instead)."""
    if isinstance(proc, WarmProcess):
        return None
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return None


def _wait_briefly(proc: subprocess.Popen | WarmProcess, pidfd: int | None, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``proc`` to end; return True once it has.

    With a pidfd (or a warm runner's socket) the wait ends the moment the process exits,
    so short engine runs pay no polling latency; without one, ``Popen.wait`` polls.
    """
    if isinstance(proc, WarmProcess):
        return proc.wait(seconds) is not None
    if pidfd is None:
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True
    select.select([pidfd], [], [], seconds)
    return proc.poll() is not None


def _until(deadline: float) -> float:
    """Return how long to wait next: ``POLL_SECONDS``, or less to stop at ``deadline``."""
    return max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))


def engine_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the whole environment an engine process gets: this process's, with
    ``extra`` (the engine command's own variables) over it."""
    return {**os.environ, **(extra or {})}


def run_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    timeout: float,
    pid_dir: Path,
    stop_file: Path,
    log: Callable[[str], None],
    log_name: str = "engine.log",
    env: dict[str, str] | None = None,
) -> ProcessOutcome:
    """Run ``argv`` in ``cwd`` in a new session and return how it ended. The process is
    killed if the thread that runs this dies (see :func:`_dies_with_owner`). The ASE
    runner is forked warm from this process's zygote where it can be
    (:func:`atomforge.engines.warm_runner.start_warm`), and then dies with the zygote,
    which ends with this process.

    Output (stdout and stderr) goes to ``cwd/log_name`` and, read back from there while the
    process runs, to ``log`` as text blocks. Past ``timeout`` seconds, or once ``stop_file``
    exists, the whole process tree is killed; a process that ran past ``timeout`` counts
    as timed out even if it ended on its own before the kill.
    """
    started = time.monotonic()
    log_path = cwd / log_name
    full_env = engine_environment(env)
    with log_path.open("ab") as log_file:
        offset = log_file.tell()
        proc: subprocess.Popen | WarmProcess | None = start_warm(
            list(argv), cwd=str(cwd), env=full_env, log_fd=log_file.fileno()
        )
        if proc is None:
            proc = subprocess.Popen(
                [*_dies_with_owner(), *argv],
                cwd=cwd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=full_env,
            )
    record = _record(proc, argv, pid_dir)
    _REAPER.tell(f"+{proc.pid}")
    output = _LogTail(log_path, offset, log)
    pidfd = _exit_handle(proc)
    timed_out = stopped = False
    deadline = started + timeout
    try:
        while not _wait_briefly(proc, pidfd, _until(deadline)):
            output.read()
            if time.monotonic() >= deadline:
                timed_out = True
            elif stop_file.exists():
                stopped = True
            if timed_out or stopped:
                kill_tree(proc.pid)
                break
        proc.wait()
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        record.unlink(missing_ok=True)
        _REAPER.tell(f"-{proc.pid}")
        if pidfd is not None:
            os.close(pidfd)
        output.close()
    wall_seconds = time.monotonic() - started
    return ProcessOutcome(
        returncode=proc.returncode,
        wall_seconds=wall_seconds,
        timed_out=timed_out or (not stopped and wall_seconds > timeout),
        stopped=stopped,
    )
