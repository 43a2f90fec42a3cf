"""The inbox: a folder of structure files that works as a job queue, shared safely by runs.

Layout (created by :meth:`Inbox.create`)::

    <inbox>/                     files waiting; drop them here
    <inbox>/processing/<run>/    files a run claimed, with .owner (host, pid, start time)
    <inbox>/done/                files whose structures all completed, each with
                                 <file>.result.json (result ids, status, message)
    <inbox>/failed/              the other files, with the same sidecar saying why

A run claims a file by renaming it into its own processing folder. ``os.rename`` is
atomic on one file system, so of two runs (workers, schedules) racing for a file exactly
one gets it and no file is computed twice. A claimed file is never deleted: it ends in
done/ or failed/, or goes back to the inbox, so none is lost. A run that dies leaves its
files in processing/; :func:`recover` gives them back to the inbox once the owner process
is gone (on this host: another host's processes cannot be checked, so hosts sharing an
inbox need distinct host names, and a claim of a host that is gone for good is moved back
by hand). A run killed in the instant between linking a file into done/ and unlinking it
from processing/ leaves it in both, and it is computed once more: at least once, never
lost. Files whose names start with ``.`` are never claimed: write a file under such a
name (or elsewhere on the same file system) and rename it into place, so no run reads it
half-written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, Field

from atomforge.flows.store.files import write_json

OWNER_FILE = ".owner"
"""JSON, but named so that no structure reader takes it for a structure file."""
SIDECAR_SUFFIX = ".result.json"
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})
ORPHAN_GRACE_SECONDS = 60.0
"""A processing folder without an owner file is someone's claim still being set up,
unless it is older than this."""


class ClaimOwner(BaseModel):
    """The process that holds a claim: enough to tell, on its host, whether it still runs."""

    host: str
    pid: int
    create_time: float
    claim_id: str
    claimed_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @classmethod
    def this_process(cls, claim_id: str) -> ClaimOwner:
        """Return the owner record of the calling process for the claim ``claim_id``."""
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            create_time=psutil.Process(pid).create_time(),
            claim_id=claim_id,
        )

    def is_this_process(self) -> bool:
        """Return True if this record names the calling process."""
        me = ClaimOwner.this_process(self.claim_id)
        return (self.host, self.pid) == (me.host, me.pid) and self._same_start(me.create_time)

    def is_dead(self) -> bool:
        """Return True only if the owner is known to be gone: a process of this host that
        no longer runs (a zombie, or another process that got its pid, counts as gone)."""
        if self.host != socket.gethostname():
            return False
        try:
            process = psutil.Process(self.pid)
            return not self._same_start(process.create_time()) or (
                process.status() == psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return True

    def _same_start(self, create_time: float) -> bool:
        return abs(create_time - self.create_time) <= 1.0


class InboxResult(BaseModel):
    """One structure of an inbox file: its result document and how it ended."""

    id: str = Field(description="'flow_run_id/id' of the result document in the result store.")
    name: str
    status: str
    message: str = ""


class FileOutcome(BaseModel):
    """What became of one inbox file; stored next to it as ``<file>.result.json``."""

    file: str = Field(description="The file's name when it was dropped into the inbox.")
    path: str = Field(description="Where the file is now (in done/ or failed/).")
    status: Literal["done", "failed"]
    message: str = ""
    flow_run_id: str
    results: list[InboxResult] = Field(default_factory=list)
    finished_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass(frozen=True)
class Inbox:
    """An inbox folder and its processing/, done/ and failed/ subfolders."""

    root: Path

    @property
    def processing(self) -> Path:
        """Return the folder of claimed files, one subfolder per claim."""
        return self.root / "processing"

    @property
    def done(self) -> Path:
        """Return the folder of files whose structures all completed."""
        return self.root / "done"

    @property
    def failed(self) -> Path:
        """Return the folder of files that did not complete, with the reason."""
        return self.root / "failed"

    def create(self) -> Inbox:
        """Create the inbox and its subfolders if needed; return the inbox."""
        for folder in (self.root, self.processing, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def waiting(self) -> list[Path]:
        """Return the files waiting in the inbox, by name (not those named ``.*``)."""
        return sorted(
            path for path in self.root.iterdir() if path.is_file() and not path.name.startswith(".")
        )


@dataclass
class Claim:
    """The files one run took from an inbox, in its own processing folder."""

    inbox: Inbox
    folder: Path
    files: list[Path] = field(default_factory=list)


def _move(source: Path, folder: Path) -> Path:
    """Move ``source`` into ``folder``, never replacing a file there; return its new path.

    A taken name gets a ``~N`` before its suffix (``water~1.xyz``). The file is linked
    under the new name before it is unlinked, so a crash leaves it in one place or both,
    never in neither (on a file system without hard links it is renamed instead).
    """
    for n in range(100_000):
        name = source.name if n == 0 else f"{source.stem}~{n}{source.suffix}"
        target = folder / name
        if (target.parent / f"{name}{SIDECAR_SUFFIX}").exists():
            continue
        try:
            os.link(source, target)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
            if target.exists():
                continue
            os.rename(source, target)
            return target
        os.unlink(source)
        return target
    raise FileExistsError(f"{folder}: no free name for {source.name}")


def claim(inbox: Inbox, claim_id: str) -> Claim:
    """Take every file waiting in ``inbox`` for the run ``claim_id``; return the claim.

    The claim folder ``processing/<claim_id>`` appears with its owner file already in it,
    then each waiting file is renamed into it; a file another run renamed first is left
    to that run. A claim folder of this same process (a retried flow run) is taken up
    again with the files still in it. An empty claim leaves no folder behind.
    """
    inbox.create()
    folder = inbox.processing / claim_id
    owner = ClaimOwner.this_process(claim_id)
    if folder.exists():
        held_by = _read_owner(folder)
        if held_by is None or not held_by.is_this_process():
            raise FileExistsError(f"{folder}: claimed by another process ({held_by})")
    else:
        staging = inbox.processing / f".new-{claim_id}-{uuid.uuid4().hex[:8]}"
        write_json(staging / OWNER_FILE, owner)
        os.rename(staging, folder)
    files = _claimed_files(folder)
    for path in inbox.waiting():
        target = folder / path.name
        if target.exists():
            continue
        try:
            os.rename(path, target)
        except FileNotFoundError:  # another run took it first
            continue
        files.append(target)
    if not files:
        shutil.rmtree(folder, ignore_errors=True)
    return Claim(inbox, folder, sorted(files))


def release(held: Claim) -> list[Path]:
    """Give the files still in a claim back to the inbox, drop the claim; return their paths."""
    returned = [_move(path, held.inbox.root) for path in _claimed_files(held.folder)]
    shutil.rmtree(held.folder, ignore_errors=True)
    held.files = []
    return returned


def finish(held: Claim, path: Path, outcome: FileOutcome) -> Path:
    """Move one claimed file to done/ or failed/ (as ``outcome.status`` says) and write its
    ``<file>.result.json`` next to it; return the file's new path."""
    target = _move(path, held.inbox.done if outcome.status == "done" else held.inbox.failed)
    outcome.path = str(target)
    write_json(target.with_name(target.name + SIDECAR_SUFFIX), outcome)
    held.files = [file for file in held.files if file != path]
    return target


def recover(inbox: Inbox) -> list[Path]:
    """Give the files of dead runs' claims back to the inbox; return their paths there.

    A claim is dead when its owner process no longer runs on this host; claims of other
    hosts are left alone. Recoveries take turns (a lock on ``processing/.recover.lock``,
    which the system drops if the recovering process dies), so no claim is given back
    twice; one that died halfway leaves the rest of the claim to the next.
    """
    inbox.create()
    returned: list[Path] = []
    with _recovery_lock(inbox):
        for folder in sorted(p for p in inbox.processing.iterdir() if p.is_dir()):
            if _abandoned(folder):
                returned += release(Claim(inbox, folder))
    return returned


@contextmanager
def _recovery_lock(inbox: Inbox) -> Iterator[None]:
    """Hold the inbox's recovery lock while the block runs."""
    with (inbox.processing / ".recover.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _abandoned(folder: Path) -> bool:
    """Return True if the claim in ``folder`` belongs to a process known to be gone.

    A folder without an owner file is a claim being set up, unless it is older than
    ``ORPHAN_GRACE_SECONDS``.
    """
    owner = _read_owner(folder)
    if owner is None:
        return time.time() - folder.stat().st_mtime > ORPHAN_GRACE_SECONDS
    return owner.is_dead()


def _claimed_files(folder: Path) -> list[Path]:
    """Return the claimed files in a claim folder (not its owner or temporary ``.*`` files)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_owner(folder: Path) -> ClaimOwner | None:
    """Return the owner record of a claim folder, or None if it has none (or unreadable)."""
    try:
        return ClaimOwner.model_validate_json((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
