"""The cores of this host as a counting semaphore of lock files.

A run-engine task holds its engine's ``cores`` slots of the limit named by
``ATOMFORGE_CORES_LIMIT`` while it runs, so the runs on one host (a service's runs, two
screens each with a cluster sized to the machine) never run more engine cores than the
host gives this process. The limit is a folder of one file per core under
``ATOMFORGE_CORES_LOCK_DIR`` (default: a folder of the user's in the temporary folder,
so a job with a temporary folder of its own, as SLURM may give, counts its own cores); a
slot is held by an exclusive ``flock`` on its file, and waiters queue on a gate file.
Holding costs no API call, and the kernel frees the slots of a process however it ends,
``kill -9`` included: a server-side limit would keep them taken until its lease expired.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POLL_SECONDS = 0.05
"""How often a task waiting for cores tries again."""

_held: set[int] = set()
"""The descriptors this process holds slots or a gate with (closed in a forked child)."""


def _close_held_in_child() -> None:
    """In a forked child, close the parent's slot descriptors: only the parent holds them."""
    for fd in list(_held):
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def host_cores() -> int:
    """Return how many cores this process may run on (its affinity, else the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def limit_folder(name: str, lock_dir: Path | None = None) -> Path:
    """Return the folder of the limit ``name``, made if needed: under ``lock_dir``, else
    under a folder of this user's in the temporary folder (mode 700; PermissionError if
    someone else owns it or it is a link)."""
    if lock_dir is None:
        root = Path(tempfile.gettempdir()) / f"atomforge-cores-{os.getuid()}"
        root.mkdir(mode=0o700, exist_ok=True)
        found = os.lstat(root)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
            raise PermissionError(f"{root}: not a folder of this user's")
        lock_dir = root
    folder = lock_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(path: Path) -> int:
    """Return a descriptor of the lock file ``path`` (made if needed, links refused)."""
    return os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _try_slots(folder: Path, wanted: int, total: int) -> list[int]:
    """Return descriptors holding ``wanted`` free slots of ``folder``'s ``total``, or an
    empty list (holding none) when fewer are free."""
    held: list[int] = []
    try:
        for slot in range(total):
            fd = _open(folder / f"slot-{slot}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            held.append(fd)
            if len(held) == wanted:
                return held
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    for fd in held:
        os.close(fd)
    return []


@contextmanager
def hold_cores(name: str, cores: int, lock_dir: Path | None = None) -> Iterator[int]:
    """Hold ``cores`` slots of the limit ``name`` (at most the host's cores), waiting until
    they are free; yield how many are held.

    Waiters queue on the limit's gate file (a blocking lock: they sleep in the kernel),
    and only the first looks for free slots, so a task that needs many cores is not
    starved by a stream of one-core tasks that would take each slot as it frees.
    """
    folder = limit_folder(name, lock_dir)
    total = host_cores()
    wanted = max(1, min(cores, total))
    gate = _open(folder / "gate")
    _held.add(gate)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        while not (held := _try_slots(folder, wanted, total)):
            time.sleep(POLL_SECONDS)
        _held.update(held)
    finally:
        if gate in _held:
            _held.discard(gate)
            os.close(gate)
    try:
        yield wanted
    finally:
        for fd in held:
            if fd in _held:  # a forked child let go of its copies already
                _held.discard(fd)
                os.close(fd)
