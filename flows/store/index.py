"""The result index: one SQLite table in the results folder, for queries and reuse.

The JSON documents stay the record; the index holds what queries and reuse look up (ids,
formula, engine, status, energies, the input key), so neither reads every document. It
is a plain table rather than an ASE database: an ASE row needs the whole structure, and
the index must stay small and fast to write from many runs at once (WAL mode, a busy
timeout). ``ase db`` and ``ase gui`` still open every structure: the documents hold them
as extended XYZ.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from atomforge.flows.models import StructureResult

INDEX_FILE = "index.sqlite"
COLUMNS = (
    "flow_run_id",
    "id",
    "name",
    "formula",
    "engine",
    "engine_version",
    "status",
    "energy_eV",
    "energy_per_atom_eV",
    "gap_eV",
    "input_key",
    "reused_from",
    "created_at",
    "parent_id",
    "workflow_run_id",
    "step",
)
TABLE = f"""
CREATE TABLE IF NOT EXISTS results ({", ".join(COLUMNS)}, PRIMARY KEY (flow_run_id, id));
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS results_by_key ON results (input_key, status);
CREATE INDEX IF NOT EXISTS results_by_formula ON results (formula);
CREATE INDEX IF NOT EXISTS results_by_created ON results (created_at);
CREATE INDEX IF NOT EXISTS results_by_workflow ON results (workflow_run_id);
"""


@dataclass(frozen=True)
class ResultFilter:
    """What a query asks of indexed results; each given field must match.

    ``flow_run_id`` may be a prefix, ``name`` a part of the name; the rest match exactly.
    """

    flow_run_id: str | None = None
    engine: str | None = None
    formula: str | None = None
    status: str | None = None
    name: str | None = None
    result_id: str | None = None
    workflow_run_id: str | None = None
    step: str | None = None


def _create(connection: sqlite3.Connection) -> None:
    """Create the table and its indexes, adding the columns an older index lacks."""
    connection.executescript(TABLE)
    present = {row[1] for row in connection.execute("PRAGMA table_info(results)")}
    for column in COLUMNS:
        if column not in present:
            connection.execute(f"ALTER TABLE results ADD COLUMN {column}")
    connection.executescript(INDEXES)


_OPEN: dict[tuple[Path, int], sqlite3.Connection] = {}
_LOCK = threading.Lock()


@contextmanager
def _connected(root: Path) -> Iterator[sqlite3.Connection]:
    """Yield this process's connection to the index of ``root``, held by the caller alone.

    A connection is opened (and the table made) once per process and results folder,
    not for each document stored: opening one cost about 4 ms, paid by every structure.
    """
    key = (root, os.getpid())
    with _LOCK:
        connection = _OPEN.get(key)
        if connection is None or not (root / INDEX_FILE).exists():
            connection = sqlite3.connect(
                root / INDEX_FILE, timeout=60, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            _create(connection)
            _OPEN[key] = connection
        yield connection


def index_result(root: Path, result: StructureResult) -> None:
    """Record ``result`` in the index (replacing an earlier entry for the same document)."""
    row = result.model_dump(mode="json", include=set(COLUMNS))
    placeholders = ", ".join("?" for _ in COLUMNS)
    with _connected(root) as connection:
        connection.execute(
            f"INSERT OR REPLACE INTO results VALUES ({placeholders})",
            [row.get(column) for column in COLUMNS],
        )


def find_completed(root: Path, input_keys: list[str]) -> dict[str, tuple[str, str]]:
    """Return, for each key that has a completed result, that result's (flow run id, id).

    Of several, the newest; a result that was itself reused points back to its origin.
    """
    if not input_keys or not (root / INDEX_FILE).exists():
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
    if not (root / INDEX_FILE).exists():
        return
    clauses, values = [], []
    for field, value in asdict(query).items():
        if not value:
            continue
        if field == "flow_run_id":
            clauses.append("flow_run_id LIKE ?")
            value = f"{value}%"
        elif field == "name":
            clauses.append("instr(name, ?) > 0")
        else:
            clauses.append(f"{'id' if field == 'result_id' else field} = ?")
        values.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT flow_run_id, id FROM results {where} ORDER BY created_at DESC, id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    with _connected(root) as connection:
        rows = connection.execute(sql, values).fetchall()
    yield from rows
