"""Benchmark: an 8-structure Quantum ESPRESSO screen (Si diamond at 8 lattice constants).

A long engine: what orchestration costs when each structure takes seconds of pw.x. The
same pw.x runs (inputs written by the espresso engine, same command and environment) go
through atomforge's ``screen`` flow and through a bare ``multiprocessing.Pool``, in
alternating rounds in one process; medians are printed with their ratio. Run:
``.venv/bin/python bench/qe_screen.py [--repeat R] [--ecutwfc RY] [--kpts N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from statistics import median

import numpy as np
from ase.build import bulk
from ase.io import write

LATTICE_CONSTANTS = np.linspace(5.30, 5.58, 8)


def bare_pw(job: tuple[str, dict]) -> float:
    """Run pw.x on one structure in a scratch folder as the espresso engine would; return eV."""
    from ase.io import read

    from atomforge.engines import get_engine, make_parameters

    extxyz, fields = job
    engine = get_engine("espresso")
    params = make_parameters("espresso", **fields)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        (directory / "in.extxyz").write_text(extxyz)
        engine.write_inputs(read(directory / "in.extxyz"), params, directory)
        command = engine.command(params, [directory])
        with (directory / engine.log_name).open("w") as log:
            subprocess.run(
                command.argv,
                cwd=directory,
                env=os.environ | command.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
            )
        return engine.read_results(directory, params).energy


def main() -> None:
    """Run both ways ``--repeat`` times, alternating, and print the median figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ecutwfc", type=float, default=50.0, help="Ry")
    parser.add_argument("--kpts", type=int, default=12, help="N for an NxNxN grid")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    args = parser.parse_args()
    os.environ["ATOMFORGE_DASK_WORKERS"] = str(args.workers)
    os.environ["ATOMFORGE_REUSE"] = "false"  # every round computes
    os.environ.setdefault("ATOMFORGE_HOME", tempfile.mkdtemp(prefix="atomforge-bench-"))
    Path(os.environ["ATOMFORGE_HOME"]).mkdir(parents=True, exist_ok=True)

    from atomforge.engines.structures import to_extxyz
    from atomforge.flows.models import StructureSource, make_parameters
    from atomforge.flows.screen import screen

    folder = Path(tempfile.mkdtemp(prefix="si-eos-", dir=os.environ["ATOMFORGE_HOME"]))
    jobs = []
    fields = {
        "kind": "singlepoint",
        "options": {"ecutwfc": args.ecutwfc, "kpts": [args.kpts] * 3},
    }
    for a in LATTICE_CONSTANTS:
        atoms = bulk("Si", "diamond", a=float(a))
        write(folder / f"si-{a:.3f}.extxyz", atoms, format="extxyz")
        jobs.append((to_extxyz(atoms), fields))
    params = make_parameters("espresso", **fields)
    asyncio.run(
        screen(StructureSource(path=str(folder / f"si-{LATTICE_CONSTANTS[0]:.3f}.extxyz")), params)
    )  # warm-up

    bare_times, forge_times = [], []
    for _ in range(args.repeat):
        started = time.perf_counter()
        with Pool(args.workers) as pool:
            bare = pool.map(bare_pw, jobs, chunksize=1)
        bare_times.append(time.perf_counter() - started)

        started = time.perf_counter()
        report = asyncio.run(screen(StructureSource(path=str(folder)), params))
        forge_times.append(time.perf_counter() - started)

    forge = {line.name: line.energy_eV for line in report.results}
    worst = max(abs(forge[f"si-{a:.3f}"] - e) for a, e in zip(LATTICE_CONSTANTS, bare))
    bare_seconds, forge_seconds = median(bare_times), median(forge_times)
    print(
        f"structures: {len(jobs)} Si diamond, pw.x ecutwfc {args.ecutwfc:g} Ry, "
        f"{args.kpts}x{args.kpts}x{args.kpts} k-points, {args.workers} workers"
    )
    print(f"median of {args.repeat} rounds (min in brackets)")
    print(f"bare multiprocessing pool: {bare_seconds:8.2f} s [{min(bare_times):.2f}]")
    print(
        f"atomforge screen:          {forge_seconds:8.2f} s [{min(forge_times):.2f}] "
        f"({report.n_completed} of {report.n_structures} completed)"
    )
    print(f"ratio atomforge / bare:    {forge_seconds / bare_seconds:8.3f}")
    print(f"overhead:                  {(forge_seconds / bare_seconds - 1) * 100:8.1f} %")
    print(f"largest energy difference: {worst:.2e} eV")


if __name__ == "__main__":
    sys.exit(main())
