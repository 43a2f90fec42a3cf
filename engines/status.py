"""How running one structure ended: a status code, written as ``status.json`` in its folder."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from atomforge.engines.process import ProcessOutcome

STATUS_FILE = "status.json"
"""How a job ended, written once the run loop has settled it: the flow parses what it says."""
RUNNER_STATUS_FILE = "runner-status.json"
"""How a batch runner's attempt at a job ended, before the run loop has diagnosed it."""
OUTSIDE_KILL_SIGNALS = frozenset({-9, -15, -1})


class Status(str, Enum):
    """How a structure's calculation ended."""

    completed = "completed"
    failed = "failed"
    crashed = "crashed"
    timeout = "timeout"
    stopped = "stopped"
    not_started = "not-started"
    invalid = "invalid"

    def __str__(self) -> str:
        return self.value


@dataclass
class JobStatus:
    """How running one structure ended, with the corrections applied on the way."""

    status: Status
    message: str = ""
    wall_seconds: float = 0.0
    returncode: int | None = None
    started_at: float | None = None
    corrections: list[dict[str, Any]] = field(default_factory=list)
    host: str | None = None
    batch_job: str | None = None

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    @property
    def completed(self) -> bool:
        """Return True when the engine finished this structure normally."""
        return self.status is Status.completed

    def write(self, directory: Path, name: str = STATUS_FILE) -> None:
        """Write this status into ``directory`` atomically, as ``name``, saying where it ran:
        this host, and the batch (SLURM) job this process runs in, if any."""
        self.host = self.host or socket.gethostname()
        self.batch_job = self.batch_job or os.environ.get("SLURM_JOB_ID")
        tmp = directory / f".{name}.tmp"
        tmp.write_text(json.dumps({**asdict(self), "status": self.status.value}))
        tmp.replace(directory / name)

    @classmethod
    def read(cls, directory: Path, name: str = STATUS_FILE) -> JobStatus | None:
        """Return the status stored in ``directory`` as ``name``, or None if there is none."""
        try:
            return cls(**json.loads((directory / name).read_text()))
        except FileNotFoundError:
            return None


def status_from_exit(outcome: ProcessOutcome, log_path: Path) -> JobStatus:
    """Return the :class:`JobStatus` of a finished engine process.

    A process killed from outside (SIGKILL, SIGTERM, SIGHUP: the OOM killer, a preempted
    node) ends as ``crashed``, the one status worth retrying.
    """
    code = outcome.returncode
    wall = outcome.wall_seconds
    if outcome.stopped:
        return JobStatus(Status.stopped, "run was stopped", wall, code)
    if outcome.timed_out:
        return JobStatus(Status.timeout, "engine exceeded its time limit", wall, code)
    if code == 0:
        return JobStatus(Status.completed, "", wall, code)
    if code in OUTSIDE_KILL_SIGNALS:
        return JobStatus(Status.crashed, f"engine killed by signal {-code}", wall, code)
    return JobStatus(Status.failed, error_summary(log_path, code), wall, code)


def error_summary(log_path: Path, returncode: int) -> str:
    """Return one line describing why an engine failed, taken from its log."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    errors = [
        line.strip(" #-*%")
        for line in lines
        if "error" in line.lower() or "not converge" in line.lower()
    ]
    detail = "; ".join(dict.fromkeys(e for e in errors[-3:] if e))
    reason = f"exit code {returncode}" if returncode > 0 else f"signal {-returncode}"
    return f"engine failed ({reason}){': ' + detail if detail else ''}"
