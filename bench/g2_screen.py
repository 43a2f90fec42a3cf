"""Benchmark: screen the closed-shell G2 molecules with GFN2-xTB optimization.

The same work runs twice in one process: through atomforge's ``screen`` flow (the embedded
Prefect API the ``atomforge`` command starts, local Dask cluster) and through a bare
``multiprocessing.Pool`` that runs the same engine with the same settings. Prints both
wall times, their ratio and the overhead per structure, as medians over ``--repeat``
alternating rounds, and where the CPU time of a round went: in the bare pool (this
process, its workers and their engines) and in atomforge (the flow's process, the engines
and runners it started, the Prefect server), with the lowest ratio that CPU allows (all
of it spread over every core of the machine, kept busy throughout). Run:
``.venv/bin/python bench/g2_screen.py [--engine xtb|tblite] [--limit N] [--copies N]
[--repeat R]`` (``--copies 10``: the 1,190-structure case).

``--whole-process`` times what a user runs instead, each round a fresh process: the bare
pool as a Python script of its own (``--bare-folder``: it imports what it uses), and the
``atomforge screen FOLDER`` command, which goes to the local server of a temporary
atomforge home (started, and a first command run, before the rounds; stopped after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from statistics import median

import psutil
from ase.collections import g2
from ase.io import read, write
from cli_command import timed

SERVER_COMMANDS = ("atomforge.flows.watchdog", "uvicorn")
"""What the command line of the embedded Prefect server (or its watchdog) contains."""


def closed_shell_g2() -> list[tuple[str, object]]:
    """Return (name, Atoms) of the G2 molecules with an even electron count and no spin."""
    molecules = []
    for name in g2.names:
        atoms = g2[name]
        if atoms.numbers.sum() % 2 == 0 and not atoms.get_initial_magnetic_moments().any():
            molecules.append((name, atoms))
    return molecules


def rattled_copies(molecules: list[tuple[str, object]], copies: int) -> list[tuple[str, object]]:
    """Return (name, Atoms): ``molecules`` themselves for one copy, else ``copies`` copies of
    each rattled by 0.02 Å with the copy number as seed, named ``<name>-<copy>``."""
    if copies == 1:
        return molecules
    structures = []
    for copy in range(copies):
        for name, atoms in molecules:
            rattled = atoms.copy()
            rattled.rattle(0.02, seed=copy)
            structures.append((f"{name}-{copy}", rattled))
    return structures


def bare_xtb(job: tuple[str, str]) -> float:
    """Optimize one xyz file with the xtb program in a scratch folder; return its energy (Eh)."""
    from atomforge.engines.registry import make_parameters
    from atomforge.engines.xtb import XtbProfile

    _, xyz = job
    profile = XtbProfile()
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "input.xyz").write_text(xyz)
        subprocess.run(
            profile.argv(make_parameters("xtb")),
            cwd=scratch,
            env=os.environ | profile.env(1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        return json.loads(Path(scratch, "xtbout.json").read_text())["total energy"]


def bare_tblite(job: tuple[str, str]) -> float:
    """Optimize one structure with tblite's ASE calculator and BFGS; return its energy (eV)."""
    from io import StringIO

    from ase.optimize import BFGS
    from tblite.ase import TBLite

    _, xyz = job
    atoms = read(StringIO(xyz), format="xyz")
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=500)
    atoms.get_forces()
    return atoms.get_potential_energy()


def one_openmp_thread() -> None:
    """Pool initializer: one OpenMP thread per worker, as atomforge gives each engine."""
    os.environ["OMP_NUM_THREADS"] = "1"


def bare_folder(folder: Path, engine: str, workers: int) -> None:
    """Compute every xyz file of ``folder`` in a bare pool, as a script of its own would."""
    jobs = [(path.stem, path.read_text()) for path in sorted(folder.glob("*.xyz"))]
    with Pool(workers, initializer=one_openmp_thread) as pool:
        done = pool.map(bare_xtb if engine == "xtb" else bare_tblite, jobs, chunksize=1)
    print(f"{len(done)} done")


def cpu_used() -> dict[str, float]:
    """Return the CPU seconds (user and system) used so far by this process, by the
    processes it has waited for and those still running under it (each with the ones it
    waited for), and by the Prefect server under it."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = {
        "process": own.ru_utime + own.ru_stime,
        "children": waited.ru_utime + waited.ru_stime,
        "server": 0.0,
    }
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            server = any(part in " ".join(child.cmdline()) for part in SERVER_COMMANDS)
        except psutil.Error:
            continue
        spent = times.user + times.system + times.children_user + times.children_system
        used["server" if server else "children"] += spent
    return used


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Return the CPU seconds of each kind used between two :func:`cpu_used` readings."""
    return {kind: after[kind] - before[kind] for kind in before}


def median_cpu(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Return the median of each kind of CPU seconds over ``rounds``."""
    return {kind: median(spent[kind] for spent in rounds) for kind in rounds[0]}


def whole_processes(folder: Path, engine: str, workers: int, repeat: int) -> tuple[list, list]:
    """Time the bare script and ``atomforge screen`` as fresh processes, alternating;
    return both lists of wall times."""
    atomforge = str(Path(sys.executable).with_name("atomforge"))
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env |= {"ATOMFORGE_LOCAL_SERVER": "true", "PREFECT_LOGGING_LEVEL": "WARNING"}
    command = [atomforge, "screen", str(folder), "--engine", engine]
    bare_command = [sys.executable, __file__, "--bare-folder", str(folder), "--engine", engine]
    bare_command += ["--workers", str(workers)]
    bare_times, forge_times = [], []
    try:
        timed(command, env, Path.cwd())  # starts the local server
        for _ in range(repeat):
            bare_times.append(timed(bare_command, env, Path.cwd()))
            forge_times.append(timed(command, env, Path.cwd()))
    finally:
        subprocess.run([atomforge, "server", "stop"], env=env, capture_output=True)
    return bare_times, forge_times


def main() -> None:
    """Run both ways ``--repeat`` times, alternating, and print the median figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="xtb", choices=["xtb", "tblite"])
    parser.add_argument("--limit", type=int, default=None, help="only the first N molecules")
    parser.add_argument(
        "--copies", type=int, default=1, help="rattled copies of each molecule (1: as they are)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument(
        "--whole-process", action="store_true", help="time each way as a fresh process"
    )
    parser.add_argument("--bare-folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_folder:
        bare_folder(args.bare_folder, args.engine, args.workers)
        return
    os.environ["ATOMFORGE_DASK_WORKERS"] = str(args.workers)
    os.environ["ATOMFORGE_REUSE"] = "false"  # every round computes
    os.environ.setdefault("ATOMFORGE_HOME", tempfile.mkdtemp(prefix="atomforge-bench-"))
    Path(os.environ["ATOMFORGE_HOME"]).mkdir(parents=True, exist_ok=True)

    from atomforge.engines.structures import to_extxyz
    from atomforge.flows import embedded_server
    from atomforge.flows.cli import set_embedded_prefect_defaults
    from atomforge.flows.models import StructureSource, make_parameters
    from atomforge.flows.screen import screen
    from atomforge.flows.simulate import simulate

    molecules = rattled_copies(closed_shell_g2()[: args.limit], args.copies)
    folder = Path(tempfile.mkdtemp(prefix="g2-", dir=os.environ["ATOMFORGE_HOME"]))
    jobs = []
    for name, atoms in molecules:
        write(folder / f"{name}.xyz", atoms, format="xyz")
        jobs.append((name, (folder / f"{name}.xyz").read_text()))
    params = make_parameters(engine=args.engine)
    bare_job = bare_xtb if args.engine == "xtb" else bare_tblite

    if args.whole_process:
        bare_times, forge_times = whole_processes(folder, args.engine, args.workers, args.repeat)
        bare_done = forge_done = "fresh processes"
    else:
        set_embedded_prefect_defaults()  # as the command sets them
        embedded_server.start()  # as `atomforge screen` with ATOMFORGE_LOCAL_SERVER=false
        asyncio.run(simulate(StructureSource(text=to_extxyz(g2["H2O"])), params))  # warm-up
        bare_times, forge_times, bare_cpu, forge_cpu = [], [], [], []
        for _ in range(args.repeat):
            started, cpu_before = time.perf_counter(), cpu_used()
            with Pool(args.workers, initializer=one_openmp_thread) as pool:
                bare = pool.map(bare_job, jobs, chunksize=1)
            bare_times.append(time.perf_counter() - started)
            bare_cpu.append(cpu_spent(cpu_before, cpu_used()))

            started, cpu_before = time.perf_counter(), cpu_used()
            report = asyncio.run(screen(StructureSource(path=str(folder)), params))
            forge_times.append(time.perf_counter() - started)
            forge_cpu.append(cpu_spent(cpu_before, cpu_used()))
        bare_done = f"{len(bare)} done"
        forge_done = f"{report.n_completed} of {report.n_structures} completed"

    n = len(molecules)
    bare_seconds, forge_seconds = median(bare_times), median(forge_times)
    copies = f" x {args.copies} rattled copies" if args.copies > 1 else ""
    print(f"molecules: {n} closed-shell G2{copies}, engine {args.engine}, {args.workers} workers")
    print(f"median of {args.repeat} rounds (min in brackets)")
    print(f"bare multiprocessing pool: {bare_seconds:8.2f} s [{min(bare_times):.2f}] ({bare_done})")
    print(
        f"atomforge screen:          {forge_seconds:8.2f} s [{min(forge_times):.2f}] ({forge_done})"
    )
    print(f"ratio atomforge / bare:    {forge_seconds / bare_seconds:8.2f}")
    print(f"overhead per structure:    {(forge_seconds - bare_seconds) / n * 1000:8.1f} ms")
    if not args.whole_process:
        print_cpu(median_cpu(bare_cpu), median_cpu(forge_cpu), args.workers, bare_seconds)


def print_cpu(
    bare: dict[str, float], forge: dict[str, float], workers: int, bare_seconds: float
) -> None:
    """Print the median CPU seconds of a round of each way, by where they were spent, the
    wall time that atomforge's extra CPU would take on ``workers`` busy cores, and the
    lowest ratio atomforge's CPU allows: all of it on all the machine's cores, kept busy
    throughout, against the bare pool's ``bare_seconds``."""
    bare_total, forge_total = sum(bare.values()), sum(forge.values())
    print(
        f"CPU a round, bare pool:    {bare_total:8.2f} s (this process {bare['process']:.2f}, "
        f"workers and engines {bare['children']:.2f})"
    )
    print(
        f"CPU a round, atomforge:    {forge_total:8.2f} s (flow process {forge['process']:.2f}, "
        f"engines and runners {forge['children']:.2f}, Prefect server {forge['server']:.2f})"
    )
    extra = forge_total - bare_total
    print(f"extra CPU / {workers} workers:    {extra / workers:8.2f} s")
    cores = os.cpu_count() or 1
    print(
        f"lowest ratio this CPU allows: {forge_total / cores / bare_seconds:6.2f} "
        f"(atomforge's CPU spread over all {cores} cores)"
    )


if __name__ == "__main__":
    sys.exit(main())
