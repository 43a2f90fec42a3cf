"""A new local server's Prefect database, copied from a migrated one instead of migrated.

Prefect builds a new SQLite database by running its migrations, about 10 s of a first
command's 17 s on a new atomforge home. The first local server of each Prefect version on
a machine keeps a copy of its database, taken right after it started and before any run,
in ``ATOMFORGE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/atomforge``, else
``~/.cache/atomforge``); the local server of every new home starts from that copy. Only
for the default database (see :func:`applies`).

A server registers Prefect's block types in its database at start, which loads every
installed Prefect collection (prefect-dask imports Dask) to find them. The database's
record of which Prefect version and collections registered them (:func:`block_types_stamp`)
lets a server with the same ones skip that; the kept database carries its record.

This module imports the standard library only (see :mod:`atomforge.flows.local_server`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

DATABASE_FILE = "prefect.db"
"""The database's name in the server's Prefect home (Prefect's default)."""


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Return the folder where atomforge keeps what it can rebuild: ``ATOMFORGE_CACHE_DIR``,
    else ``atomforge`` in the user's cache folder."""
    if folder := env.get("ATOMFORGE_CACHE_DIR"):
        return Path(folder).expanduser()
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "atomforge"


def template(version: str, env: Mapping[str, str] = os.environ) -> Path:
    """Return where the database of Prefect ``version`` is kept."""
    return cache_dir(env) / f"prefect-{version}.db"


def block_types_stamp(version: str) -> str:
    """Return what decides the block types a Prefect server registers: the Prefect
    ``version`` and each installed Prefect collection's distribution and version."""
    from importlib.metadata import entry_points  # here: only a starting server asks

    collections = sorted(
        f"{point.dist.name}=={point.dist.version}" if point.dist else point.value
        for point in entry_points(group="prefect.collections")
    )
    return "; ".join([f"prefect=={version}", *collections])


def kept_stamp_file(version: str, env: Mapping[str, str] = os.environ) -> Path:
    """Return where the block types stamp of the kept database of Prefect ``version`` is."""
    return template(version, env).with_suffix(".blocks")


def kept_block_types(version: str, env: Mapping[str, str] = os.environ) -> str | None:
    """Return the block types stamp of the kept database of Prefect ``version``, if any."""
    try:
        return kept_stamp_file(version, env).read_text()
    except OSError:
        return None


MIGRATED_BY = "migrated-by"
"""The record of the Prefect version that last migrated a home's database."""

BLOCK_TYPES_BY = "block-types-registered-by"
"""The record of what registered the block types in a home's database
(:func:`block_types_stamp`)."""

BLOCK_REGISTRATION_SETTINGS = (
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START",
    "PREFECT_API_BLOCKS_REGISTER_ON_START",
    "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION",
    "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION",
)
"""Prefect's settings of block type registration at a server's start: when the
environment sets any, the server does as they say and nothing is recorded (settings in
Prefect's files are not looked at)."""


def registration_set(env: Mapping[str, str] = os.environ) -> bool:
    """Return whether ``env`` sets how a server registers block types (any of
    :data:`BLOCK_REGISTRATION_SETTINGS`)."""
    return any(name in env for name in BLOCK_REGISTRATION_SETTINGS)


def read_record(prefect_home: Path, name: str) -> str | None:
    """Return the record ``name`` about the database in ``prefect_home``, if there is one."""
    try:
        return (prefect_home / name).read_text().strip()
    except OSError:
        return None


def write_record(prefect_home: Path, name: str, value: str) -> None:
    """Record ``value`` as ``name`` about the database in ``prefect_home``."""
    (prefect_home / name).write_text(value)


def forget_records(prefect_home: Path) -> None:
    """Remove the records about the database in ``prefect_home`` (it is about to be new)."""
    for name in (MIGRATED_BY, BLOCK_TYPES_BY):
        (prefect_home / name).unlink(missing_ok=True)


DATABASE_SETTINGS = ("CONNECTION_URL", "DRIVER", "HOST", "PORT", "NAME", "USER", "PASSWORD")
"""Prefect's settings that point its server at another database than the default."""


def applies(env: Mapping[str, str] = os.environ) -> bool:
    """Return whether the server uses Prefect's default database (a template may seed it):
    no ``PREFECT_SERVER_DATABASE_*`` (or ``PREFECT_API_DATABASE_*``) setting names
    another."""
    return not any(
        env.get(f"{prefix}_{name}")
        for prefix in ("PREFECT_SERVER_DATABASE", "PREFECT_API_DATABASE")
        for name in DATABASE_SETTINGS
    )


def seed(database: Path, version: str, env: Mapping[str, str] = os.environ) -> bool:
    """Copy the kept database of Prefect ``version`` to ``database`` if that does not exist
    yet; return whether it did."""
    kept = template(version, env)
    if database.exists() or not kept.is_file():
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=database.parent, prefix=f".{database.name}.")
    os.close(fd)
    try:
        shutil.copyfile(kept, partial)
        os.replace(partial, database)
    except OSError:
        Path(partial).unlink(missing_ok=True)
        return False
    return True


def keep(
    database: Path, version: str, block_types: str | None, env: Mapping[str, str] = os.environ
) -> Path | None:
    """Keep a consistent copy of ``database`` (a server may have it open) as the template
    of Prefect ``version``, with the stamp of the ``block_types`` registered in it (None:
    not known), unless one is kept already; return its path, or None when nothing was
    kept (one exists, or the cache cannot be written)."""
    kept = template(version, env)
    if kept.exists() or not database.is_file():
        return None
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=kept.parent, prefix=f".{kept.name}.")
    except OSError:
        return None
    os.close(fd)
    import sqlite3  # here: commands import this module, and only a new server keeps

    try:
        source = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy)
        finally:
            source.close()
            copy.close()
        _keep_block_types(kept_stamp_file(version, env), block_types)
        os.replace(partial, kept)
    except (OSError, sqlite3.Error):
        Path(partial).unlink(missing_ok=True)
        return None
    return kept


def _keep_block_types(path: Path, block_types: str | None) -> None:
    """Write the stamp ``block_types`` to ``path`` whole, or remove it when not known."""
    if block_types is None:
        path.unlink(missing_ok=True)
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(block_types)
    os.replace(partial, path)


def discard(version: str, env: Mapping[str, str] = os.environ) -> None:
    """Remove the kept database of Prefect ``version`` and its block types stamp."""
    template(version, env).unlink(missing_ok=True)
    kept_stamp_file(version, env).unlink(missing_ok=True)
