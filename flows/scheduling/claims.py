"""Claims on job directories: which run-engine task runs which structure.

A task claims a directory by creating its claim file, exclusively, just before it runs
it; a claim the same task already holds (on a retry) is still its own. Each task runs its
own chunk front to back, then takes the unclaimed jobs of the other chunks from their
backs: a task that finishes early takes over the untouched tail of a slower one, so no
worker idles while structures wait. The claims live in the job directories, so this
works across hosts that share the work root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

CLAIM_FILE = "claim"


def claim(directory: Path, owner: str) -> bool:
    """Return True if ``owner`` holds the claim on ``directory``, taking it if it is free."""
    path = directory / CLAIM_FILE
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return claim_owner(directory) == owner
    with os.fdopen(fd, "w") as handle:
        handle.write(owner)
    return True


def claim_owner(directory: Path) -> str | None:
    """Return who holds the claim on ``directory``, or None if nobody does (yet)."""
    try:
        return (directory / CLAIM_FILE).read_text() or None
    except FileNotFoundError:
        return None


def claimed_directories(
    chunks: list[list[Path]], index: int, owner: str, take_over: bool
) -> Iterator[Path]:
    """Yield, each once claimed, the directories the task of chunk ``index`` should run.

    First its own chunk in order; then, if ``take_over``, the unclaimed directories of
    the other chunks, each chunk from its back.
    """
    for directory in chunks[index]:
        if claim(directory, owner):
            yield directory
    if not take_over:
        return
    for other, chunk in enumerate(chunks):
        if other == index:
            continue
        for directory in reversed(chunk):
            if claim(directory, owner):
                yield directory
