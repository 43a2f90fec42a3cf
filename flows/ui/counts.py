"""How far a run is: structures done, failed, running and left, read from their folders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from atomforge.engines.status import STATUS_FILE, JobStatus
from atomforge.flows.scheduling.claims import CLAIM_FILE


@dataclass(frozen=True)
class Counts:
    """A run's structures by where they are: completed, not completed, being computed by an
    engine now, and not started yet."""

    done: int
    failed: int
    running: int
    left: int

    @property
    def total(self) -> int:
        """Return how many structures the run has."""
        return self.done + self.failed + self.running + self.left


def count(total: int, done: int, failed: int, unparsed: list[Path]) -> Counts:
    """Return the counts of a run of ``total`` structures, ``done`` and ``failed`` of them
    parsed, whose ``unparsed`` job folders (those an engine may still compute) are looked at.

    A folder no engine run has claimed is left (an engine claims a folder before it
    writes a status there); a claimed one with a status that the flow has not parsed yet
    counts as done or failed as that status says, without one as running. One file check
    per unclaimed folder, two or three per claimed one, none per parsed one.
    """
    running = 0
    for directory in unparsed:
        if not os.path.exists(directory / CLAIM_FILE):
            continue
        if not os.path.exists(directory / STATUS_FILE):
            running += 1
            continue
        status = _status(directory)
        if status is not None and status.completed:
            done += 1
        else:
            failed += 1
    return Counts(done, failed, running, max(total - done - failed - running, 0))


def _status(directory: Path) -> JobStatus | None:
    """Return the status in ``directory``, or None if it cannot be read (being written)."""
    try:
        return JobStatus.read(directory)
    except (OSError, ValueError, TypeError):
        return None


def counts_markdown(title: str, counts: Counts, finished: bool = False) -> str:
    """Return the counts as a markdown report: a line of numbers, then a one-row table."""
    state = "finished" if finished else "running"
    return "\n".join(
        [
            f"# {title}",
            "",
            f"**{counts.done + counts.failed} of {counts.total}** structure(s) ended "
            f"(run {state}).",
            "",
            "| done | failed | running | left |",
            "|---:|---:|---:|---:|",
            f"| {counts.done} | {counts.failed} | {counts.running} | {counts.left} |",
        ]
    )
