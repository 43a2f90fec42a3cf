"""Run a helper command that lives no longer than its owner process.

``python -m atomforge.flows.watchdog OWNER_PID -- COMMAND...`` starts COMMAND and waits:

- it leaves the terminal's process group first (a session of its own), so Ctrl-C reaches
  only the owner, which decides what to stop and when;
- when the owner ends, also by ``kill -9`` or the OOM killer, it stops COMMAND (SIGTERM,
  then SIGKILL after a grace period) and exits;
- COMMAND gets SIGKILL if this watchdog itself is killed (a parent-death signal: this
  process has one thread, so the signal follows its life);
- SIGTERM is passed on to COMMAND, and the watchdog exits with COMMAND's exit code.

The owner need not be its parent: a pidfd follows any process. This module imports the
standard library only, so that it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

MODULE = "atomforge.flows.watchdog"
GRACE_SECONDS = 5.0
"""How long the command has to exit after SIGTERM before it gets SIGKILL."""
POLL_SECONDS = 0.5
"""How often the watchdog looks at the owner and the command when no exit wakes it."""
_PR_SET_PDEATHSIG = 1


def watched(argv: Sequence[str], owner: int | None = None) -> list[str]:
    """Return the command line that runs ``argv`` under a watchdog of ``owner`` (default:
    this process)."""
    owner = os.getpid() if owner is None else owner
    return [sys.executable, "-m", MODULE, str(owner), "--", *argv]


def _die_with_this_process() -> None:
    """Ask the kernel for SIGKILL when this process's parent (the watchdog) ends."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _owner_handle(owner: int) -> int | None:
    """Return a pidfd of ``owner``, or None where there is none (then it is polled).
    Raises ProcessLookupError if the owner is already gone."""
    try:
        return os.pidfd_open(owner)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, ProcessLookupError):
            raise
        os.kill(owner, 0)
        return None


def _owner_alive(owner: int, handle: int | None) -> bool:
    """Return whether the owner still runs (a zombie has ended)."""
    if handle is not None:
        return not select.select([handle], [], [], 0)[0]
    try:
        with open(f"/proc/{owner}/stat") as stat:
            return not stat.read().rsplit(")", 1)[1].startswith(" Z")
    except OSError:
        return False


def _stop(child: subprocess.Popen) -> None:
    """Stop ``child``: SIGTERM, then SIGKILL after the grace period."""
    child.terminate()
    try:
        child.wait(GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def watch(owner: int, argv: Sequence[str]) -> int:
    """Run ``argv`` until it exits or ``owner`` ends; return its exit code (1 if the owner
    was gone before it started, 0 once it was stopped because the owner ended)."""
    with contextlib.suppress(PermissionError):
        os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        handle = _owner_handle(owner)
    except ProcessLookupError:
        return 1
    terminated: list[float] = []
    child = subprocess.Popen(list(argv), preexec_fn=_die_with_this_process)

    def pass_on(signum: int, frame: object) -> None:
        terminated.append(time.monotonic())
        os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, pass_on)
    waits = [handle, os.pidfd_open(child.pid)] if handle is not None else []
    while child.poll() is None:
        if not _owner_alive(owner, handle):
            _stop(child)
            return 0
        if terminated and time.monotonic() - terminated[0] > GRACE_SECONDS:
            child.kill()
        select.select(waits, [], [], POLL_SECONDS)
    return child.returncode


def main(argv: Sequence[str]) -> int:
    """Run ``OWNER_PID -- COMMAND...``; return the exit code (2 for a bad command line)."""
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print(f"usage: python -m {MODULE} OWNER_PID -- COMMAND...", file=sys.stderr)
        return 2
    return watch(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
