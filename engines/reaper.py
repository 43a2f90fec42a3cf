"""Stop the engine sessions a process leaves behind when it dies, however it dies.

Engines run in sessions of their own (a cancel kills a whole session), and a parent-death
signal stops each engine's first process when the thread that started it ends. What that
process started is not covered: the program a wrapper script runs without ``exec``, an
``mpirun`` under such a script. So a process that runs engines starts one reaper,
``python -m atomforge.engines.reaper``, with a pipe as its standard input, and writes
``+SID`` to it when an engine session starts and ``-SID`` when it ends. When the pipe
closes, because the owner exited, was killed with ``kill -9`` or by the OOM killer, the
reaper kills every process of the sessions still open and exits.

This module imports the standard library only: it starts in a few tens of milliseconds,
once per process that runs engines, beside the first engine.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

MODULE = "atomforge.engines.reaper"


def stat_fields(pid: int | str) -> list[str] | None:
    """Return the fields of ``/proc/PID/stat`` after the command name (state, parent,
    process group, session...), or None if there is no process ``pid``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_members(sid: int) -> list[int]:
    """Return the pids of the processes in session ``sid`` (read from /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(entry.name)
        if fields is not None and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def reap(sessions: Iterable[int]) -> list[int]:
    """Kill every process of ``sessions`` (SIGKILL); return the pids that were signalled."""
    killed = []
    for sid in sessions:
        for pid in session_members(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)
    return killed


def follow(lines: Iterable[str]) -> set[int]:
    """Return the sessions still open once ``lines`` (``+SID`` / ``-SID``) end."""
    sessions: set[int] = set()
    for line in lines:
        sign, sid = line[:1], line[1:].strip()
        if sid.isdigit():
            (sessions.add if sign == "+" else sessions.discard)(int(sid))
    return sessions


def main() -> int:
    """Follow the owner's sessions on standard input; reap the open ones at its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reap(follow(sys.stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
