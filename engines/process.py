"""Start engine processes in their own session, stream their output, and kill whole trees.

Every process started here records itself in a pid directory (a JSON file per process),
so that a cancellation hook running in another process can find and stop it, and it polls
a stop file so that a stop also works where that hook cannot reach the host.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL_SECONDS = 0.1
KILL_GRACE_SECONDS = 3.0


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


def _record(proc: subprocess.Popen, argv: Sequence[str], pid_dir: Path) -> Path:
    """Write a JSON record of ``proc`` into ``pid_dir`` and return its path."""
    pid_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": proc.pid,
        "host": socket.gethostname(),
        "create_time": psutil.Process(proc.pid).create_time(),
        "argv": list(argv),
    }
    path = pid_dir / f"{proc.pid}.json"
    path.write_text(json.dumps(record))
    return path


READ_BYTES = 65536


def _pump(stream, log_path: Path, sink: Callable[[str], None]) -> None:
    """Copy a process's output into ``log_path`` and hand it to ``sink`` as decoded text.

    Output is read in blocks as it arrives, not line by line, so chatty engines (xtb
    writes hundreds of lines per structure) cost a few reads per run, not a call per line.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with log_path.open("ab") as log_file:
        while block := stream.read(READ_BYTES):
            log_file.write(block)
            sink(decoder.decode(block))
        if tail := decoder.decode(b"", final=True):
            sink(tail)


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


def _wait_briefly(proc: subprocess.Popen, pump: threading.Thread) -> bool:
    """Wait up to ``POLL_SECONDS`` for ``proc`` to end; return True once it has.

    While the output pump runs, joining it wakes up the moment the process closes its
    output, so short engine runs pay no polling latency.
    """
    if pump.is_alive():
        pump.join(POLL_SECONDS)
    else:
        try:
            proc.wait(POLL_SECONDS)
        except subprocess.TimeoutExpired:
            return False
    return proc.poll() is not None


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
    """Run ``argv`` in ``cwd`` in a new session and return how it ended.

    Output (stdout and stderr) goes to ``log`` as text blocks and to ``cwd/log_name``. Past
    ``timeout`` seconds, or once ``stop_file`` exists, the whole process tree is killed.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        bufsize=0,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    record = _record(proc, argv, pid_dir)
    pump = threading.Thread(target=_pump, args=(proc.stdout, cwd / log_name, log), daemon=True)
    pump.start()
    timed_out = stopped = False
    try:
        while not _wait_briefly(proc, pump):
            if time.monotonic() - started > timeout:
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
        pump.join(timeout=5)
    return ProcessOutcome(
        returncode=proc.returncode,
        wall_seconds=time.monotonic() - started,
        timed_out=timed_out,
        stopped=stopped,
    )
