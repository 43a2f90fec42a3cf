"""Benchmark: one screen of many structures, for what grows with their number.

The closed-shell G2 molecules made of H, C, N and O, in rattled copies (fixed seeds) up to
``--n`` structures, go through one ``screen`` (EMT single points by default: the engine
costs next to nothing, so what is measured is atomforge and Prefect). Prefect runs on a
fresh embedded server of its own (``PREFECT_HOME`` in a temporary folder), so its database
holds this run only. Prints the wall time and structures per second, the flow process's
peak resident memory, the rows each Prefect table gained (a smaller ``--compare`` run
first shows whether they grow with the structures), and how long
``atomforge results --formula H2O`` takes as a fresh process over the stored results.
Run: ``.venv/bin/python bench/scale_screen.py [--n 10000] [--compare 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from ase.collections import g2
from ase.io import write

ELEMENTS = set("HCNO")


def molecules(n: int) -> list:
    """Return ``n`` structures: the closed-shell H/C/N/O G2 molecules in rattled copies."""
    names = [
        name
        for name in g2.names
        if set(g2[name].get_chemical_symbols()) <= ELEMENTS
        and g2[name].numbers.sum() % 2 == 0
        and not g2[name].get_initial_magnetic_moments().any()
    ]
    structures = []
    copy = 0
    while len(structures) < n:
        for name in names[: n - len(structures)]:
            atoms = g2[name]
            atoms.rattle(0.02, seed=copy)
            atoms.info["name"] = f"{name}-{copy}"
            structures.append(atoms)
        copy += 1
    return structures


def table_rows(database: Path) -> dict[str, int]:
    """Return the number of rows of each table of the Prefect database at ``database``."""
    with sqlite3.connect(database) as connection:
        tables = [
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        return {t: connection.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}


def screen_once(n: int, folder: Path, params: object) -> tuple[float, int]:
    """Screen ``n`` structures written into ``folder``; return seconds and completed."""
    from atomforge.flows.models import StructureSource
    from atomforge.flows.screen import screen

    source = folder / f"molecules-{n}.extxyz"
    write(source, molecules(n), format="extxyz")
    started = time.perf_counter()
    report = asyncio.run(screen(StructureSource(path=str(source)), params))
    return time.perf_counter() - started, report.n_completed


def results_query_seconds(repeat: int = 5) -> float:
    """Return the median wall time of ``atomforge results --formula H2O`` as a process."""
    command = [str(Path(sys.executable).with_name("atomforge")), "results", "--formula", "H2O"]
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return median(times)


def main() -> None:
    """Screen ``--compare`` then ``--n`` structures; print what grew and by how much."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="structures in the big screen")
    parser.add_argument("--compare", type=int, default=1000, help="structures in a small one")
    parser.add_argument("--engine", default="emt", choices=["emt", "xtb"])
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="atomforge-bench-scale-"))
    os.environ.setdefault("ATOMFORGE_HOME", str(scratch / "home"))
    os.environ["PREFECT_HOME"] = str(scratch / "prefect")
    os.environ["ATOMFORGE_REUSE"] = "false"
    Path(os.environ["ATOMFORGE_HOME"]).mkdir(parents=True, exist_ok=True)
    database = Path(os.environ["PREFECT_HOME"]) / "prefect.db"

    from atomforge.flows.models import make_parameters

    params = make_parameters(args.engine, kind="singlepoint")
    folder = Path(tempfile.mkdtemp(dir=os.environ["ATOMFORGE_HOME"]))
    screen_once(2, folder, params)  # warm-up: the server, its database, the imports
    rows = [table_rows(database)]
    figures = []
    for n in (args.compare, args.n):
        seconds, completed = screen_once(n, folder, params)
        rows.append(table_rows(database))
        figures.append((n, seconds, completed))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    query = results_query_seconds()

    print(f"engine {args.engine} single points, closed-shell H/C/N/O G2 molecules, rattled")
    for n, seconds, completed in figures:
        print(f"{n:>6} structures: {seconds:8.2f} s, {n / seconds:7.1f} /s, {completed} completed")
    print(f"flow process peak resident memory: {peak_mb:.0f} MB")
    print(f"Prefect rows added by table ({args.compare} / {args.n} structures):")
    for table in sorted(rows[0]):
        small = rows[1][table] - rows[0][table]
        big = rows[2][table] - rows[1][table]
        if small or big:
            print(f"  {table:<28} {small:>7} {big:>7}")
    total = args.compare + args.n + 2
    print(f"atomforge results --formula H2O over {total} results: {query:.2f} s (median of 5)")


if __name__ == "__main__":
    sys.exit(main())
