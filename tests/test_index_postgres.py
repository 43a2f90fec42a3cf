"""The result index on a real PostgreSQL server (ATOMFORGE_INDEX_URL): reuse and queries."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest
from ase.build import molecule
from ase.io import write

from atomforge.engines import make_parameters
from atomforge.flows.cli import main
from atomforge.flows.models import StructureSource
from atomforge.flows.screen import screen
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import query_results
from atomforge.flows.store.index import INDEX_FILE, find_completed


def _as_postgres(command: list[str]) -> list[str]:
    """Return ``command`` run as the postgres user when we are root (PostgreSQL refuses root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres_url():
    """Start a PostgreSQL server of its own (Debian's postgresql package) on a free
    loopback port; yield its URL; stop it and remove its data."""
    bindir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
    home = Path(tempfile.mkdtemp(prefix="atomforge-pg-"))
    home.chmod(0o777)
    data = home / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "atomforge"]),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(home / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    url = f"postgresql://atomforge@127.0.0.1:{port}/postgres"
    try:
        yield url
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def indexed_in_postgres(postgres_url, monkeypatch, tmp_path):
    monkeypatch.setenv("ATOMFORGE_INDEX_URL", postgres_url)
    monkeypatch.setenv("ATOMFORGE_REUSE", "true")
    monkeypatch.setenv("ATOMFORGE_HOME", str(tmp_path / "home"))
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS results")
    return postgres_url


def test_screen_indexes_in_postgres_and_a_rerun_reuses_from_it(
    indexed_in_postgres, tmp_path, capsys
):
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("H2O", "NH3"):
        write(folder / f"{name}.xyz", molecule(name), format="xyz")
    params = make_parameters("xtb", kind="singlepoint")
    first = asyncio.run(screen(StructureSource(path=str(folder)), params))
    second = asyncio.run(screen(StructureSource(path=str(folder)), params))
    root = get_settings().resolved_results_root()
    assert not (root / INDEX_FILE).exists()
    with psycopg.connect(indexed_in_postgres) as connection:
        rows = connection.execute(
            'SELECT flow_run_id, name, status, "energy_eV" FROM results ORDER BY created_at'
        ).fetchall()
    assert len(rows) == 4 and {row[0] for row in rows} == {first.flow_run_id, second.flow_run_id}
    reused = query_results(root, flow_run_id=second.flow_run_id)
    assert all(r.reused_from and r.reused_from.startswith(first.flow_run_id) for r in reused)
    water = next(r for r in reused if r.name == "H2O")
    assert find_completed(root, [water.input_key])[water.input_key][0] == first.flow_run_id
    assert main(["results", "--formula", "H2O", "--name", "h2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and all("H2O" in line for line in printed[1:])
