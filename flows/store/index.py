"""The result index: one table of results, for queries and reuse.

SQLite in the results folder by default; the production PostgreSQL when
``ATOMFORGE_INDEX_URL`` names one (``postgresql://user@host/db``), so that workers on
several machines share one index. The JSON documents stay the record; the index holds
what queries and reuse look up (ids, formula, engine, status, energies, the input key,
the workflow lineage), so neither reads every document. It is a plain table rather
than an ASE database: an ASE row needs the whole structure, and the index must stay
small and fast to write from many runs at once (WAL mode and a busy timeout on SQLite).
``ase db`` and ``ase gui`` still open every structure: the documents hold them as
extended XYZ.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atomforge.flows.settings import get_settings
from atomforge.flows.store.records import StructureResult

INDEX_FILE = "index.sqlite"
COLUMN_TYPES = {
    "flow_run_id": "TEXT NOT NULL",
    "id": "TEXT NOT NULL",
    "name": "TEXT",
    "formula": "TEXT",
    "engine": "TEXT",
    "engine_version": "TEXT",
    "status": "TEXT",
    "energy_eV": "DOUBLE PRECISION",
    "energy_per_atom_eV": "DOUBLE PRECISION",
    "gap_eV": "DOUBLE PRECISION",
    "input_key": "TEXT",
    "reused_from": "TEXT",
    "created_at": "TEXT",
    "parent_id": "TEXT",
    "workflow_run_id": "TEXT",
    "step": "TEXT",
}
COLUMNS = tuple(COLUMN_TYPES)
TABLE = (
    "CREATE TABLE IF NOT EXISTS results ("
    + ", ".join(f'"{name}" {kind}' for name, kind in COLUMN_TYPES.items())
    + ", PRIMARY KEY (flow_run_id, id))"
)
INDEXES = (
    "CREATE INDEX IF NOT EXISTS results_by_key ON results (input_key, status)",
    "CREATE INDEX IF NOT EXISTS results_by_formula ON results (formula)",
    "CREATE INDEX IF NOT EXISTS results_by_created ON results (created_at)",
    "CREATE INDEX IF NOT EXISTS results_by_workflow ON results (workflow_run_id)",
)
UPSERT = (
    f"INSERT INTO results ({', '.join(f'{chr(34)}{c}{chr(34)}' for c in COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)}) ON CONFLICT (flow_run_id, id) DO UPDATE SET "
    + ", ".join(f'"{c}" = excluded."{c}"' for c in COLUMNS[2:])
)


@dataclass(frozen=True)
class ResultFilter:
    """What a query asks of indexed results; each given field must match.

    Run ids may be prefixes, ``name`` a part of the name; the rest match exactly.
    """

    flow_run_id: str | None = None
    engine: str | None = None
    formula: str | None = None
    status: str | None = None
    name: str | None = None
    result_id: str | None = None
    workflow_run_id: str | None = None
    step: str | None = None


class IndexConnection:
    """One connection to the index, SQLite or PostgreSQL, taking SQLite's SQL: ``?`` marks,
    and a LIKE that ignores case (ILIKE on PostgreSQL)."""

    def __init__(self, connection: Any, postgres: bool) -> None:
        self.connection = connection
        self.postgres = postgres

    def execute(self, sql: str, values: Sequence[Any] = ()) -> list[tuple]:
        """Run ``sql`` with ``values``; return the rows it selected (none for others)."""
        if self.postgres:
            sql = sql.replace("?", "%s").replace(" LIKE ", " ILIKE ")
        cursor = self.connection.execute(sql, tuple(values))
        return cursor.fetchall() if cursor.description else []

    def create(self) -> None:
        """Create the table and its indexes, adding the columns an older index lacks
        (on PostgreSQL under an advisory lock: processes starting together take turns)."""
        if self.postgres:
            self.execute("SELECT pg_advisory_lock(hashtext('atomforge-index'))")
        try:
            self._create()
        finally:
            if self.postgres:
                self.execute("SELECT pg_advisory_unlock(hashtext('atomforge-index'))")

    def _create(self) -> None:
        """Create the table and its indexes, and add missing columns."""
        self.execute(TABLE)
        if self.postgres:
            present = {
                row[0]
                for row in self.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'results'"
                )
            }
        else:
            present = {row[1] for row in self.execute("PRAGMA table_info(results)")}
        present = {column.lower() for column in present}
        for column, kind in COLUMN_TYPES.items():
            if column.lower() not in present:
                plain = kind.replace(" NOT NULL", "")
                self.execute(f'ALTER TABLE results ADD COLUMN "{column}" {plain}')
        for statement in INDEXES:
            self.execute(statement)


def _open(root: Path, url: str | None) -> IndexConnection:
    """Return a new connection to the index of ``root`` (PostgreSQL at ``url`` if given)."""
    if url:
        import psycopg

        connection = IndexConnection(psycopg.connect(url, autocommit=True), postgres=True)
    else:
        raw = sqlite3.connect(
            root / INDEX_FILE, timeout=60, isolation_level=None, check_same_thread=False
        )
        raw.execute("PRAGMA journal_mode=WAL")
        # in WAL mode NORMAL never corrupts the index; a power cut may lose its last
        # rows, as it may the documents (not synced either). FULL synced every row.
        raw.execute("PRAGMA synchronous=NORMAL")
        connection = IndexConnection(raw, postgres=False)
    connection.create()
    return connection


_OPEN: dict[tuple[Path, int], IndexConnection] = {}
_LOCK = threading.Lock()


@contextmanager
def _connected(root: Path) -> Iterator[IndexConnection]:
    """Yield this process's connection to the index of ``root``, held by the caller alone.

    A connection is opened (and the table made) once per process and results folder,
    not for each document stored: opening one cost about 4 ms, and reading the settings
    for ``ATOMFORGE_INDEX_URL`` 7 ms, paid by every structure. The URL is therefore read
    when a process first opens the index of a results folder.
    """
    key = (root, os.getpid())
    with _LOCK:
        connection = _OPEN.get(key)
        if connection is None or (not connection.postgres and not (root / INDEX_FILE).exists()):
            connection = _open(root, get_settings().index_url)
            _OPEN[key] = connection
        yield connection


def _exists(root: Path) -> bool:
    """Return True if there may be an index to read (a PostgreSQL one always may)."""
    if (root / INDEX_FILE).exists():
        return True
    open_here = _OPEN.get((root, os.getpid()))
    return open_here.postgres if open_here else bool(get_settings().index_url)


def index_result(root: Path, result: StructureResult) -> None:
    """Record ``result`` in the index (replacing an earlier entry for the same document)."""
    row = result.model_dump(mode="json", include=set(COLUMNS))
    with _connected(root) as connection:
        connection.execute(UPSERT, [row.get(column) for column in COLUMNS])


def find_completed(root: Path, input_keys: list[str]) -> dict[str, tuple[str, str]]:
    """Return, for each key that has a completed result, that result's (flow run id, id).

    Of several, the newest; a result that was itself reused points back to its origin.
    """
    if not input_keys or not _exists(root):
        return {}
    found: dict[str, tuple[str, str]] = {}
    with _connected(root) as connection:
        for start in range(0, len(input_keys), 500):
            batch = input_keys[start : start + 500]
            rows = connection.execute(
                "SELECT input_key, flow_run_id, id, reused_from FROM results "
                f"WHERE status = 'completed' AND input_key IN ({', '.join('?' for _ in batch)}) "
                "ORDER BY created_at",
                batch,
            )
            for key, flow_run_id, result_id, reused_from in rows:
                origin = reused_from.split("/", 1) if reused_from else (flow_run_id, result_id)
                found[key] = (origin[0], origin[1])
    return found


def query_index(
    root: Path, query: ResultFilter, limit: int | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (flow run id, id) of indexed results matching ``query``, newest first."""
    if not _exists(root):
        return
    clauses, values = [], []
    for field, value in asdict(query).items():
        if not value:
            continue
        if field in ("flow_run_id", "workflow_run_id"):
            clauses.append(f"{field} LIKE ?")
            value = f"{value}%"
        elif field == "name":
            clauses.append("name LIKE ?")
            value = f"%{value}%"
        else:
            clauses.append(f'"{"id" if field == "result_id" else field}" = ?')
        values.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT flow_run_id, id FROM results {where} ORDER BY created_at DESC, id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    with _connected(root) as connection:
        rows = connection.execute(sql, values)
    yield from rows
