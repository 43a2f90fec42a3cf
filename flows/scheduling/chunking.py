"""Split a run's jobs into as many chunks as there are workers, balanced by estimated cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

from ase import Atoms

T = TypeVar("T")


def estimated_cost(atoms: Atoms) -> float:
    """Return a rough relative cost of computing ``atoms``: the atom count squared.

    Only the ratios matter; they balance chunks, so a 20-atom molecule weighs as much as
    four 10-atom ones, close to how semi-empirical and DFT engines scale on small systems.
    """
    return float(len(atoms)) ** 2


def n_chunks(n_jobs: int, slots: int, chunk_size: int | None) -> int:
    """Return how many chunks ``n_jobs`` jobs make: one per slot, or ``ceil(n / chunk_size)``."""
    wanted = math.ceil(n_jobs / chunk_size) if chunk_size else slots
    return max(1, min(n_jobs, wanted))


def balanced_chunks(items: Sequence[T], costs: Sequence[float], n: int) -> list[list[T]]:
    """Return ``items`` split into at most ``n`` chunks of about equal total cost.

    Longest-processing-time-first: the costliest item goes to the cheapest chunk so far.
    Each chunk keeps the input order of its items; empty chunks are left out.
    """
    loads = [0.0] * n
    members: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(items)), key=lambda i: -costs[i]):
        target = min(range(n), key=loads.__getitem__)
        members[target].append(i)
        loads[target] += costs[i]
    return [[items[i] for i in sorted(chunk)] for chunk in members if chunk]
