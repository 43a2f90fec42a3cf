"""Benchmark: relax small crystals (cell too) with CHGNet through ``screen`` and bare.

The same crystals (primitive cells of a few ``ase.build.bulk`` prototypes, strained and
rattled with a fixed seed) are relaxed in the same run two ways: through atomforge's
``screen`` flow (embedded Prefect API, local Dask cluster, one runner process per chunk
that loads the model once), and by a bare loop in one fresh process over CHGNet's own ASE
calculator with the same optimizer (BFGS on a FrechetCellFilter), fmax and step limit
(torch's own threads use the cores). The bare figure is the loop alone, model load
included: its interpreter start and imports are left out (printed apart). Prints both
wall times and their ratio as medians over ``--repeat`` alternating rounds, and the
largest energy difference between the two. Needs atomforge and chgnet only. Run:
``.venv/bin/python bench/chgnet_screen.py [--n 500] [--device cpu|cuda] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.io import write

PROTOTYPES = [
    ("Si", "diamond", 5.43),
    ("Cu", "fcc", 3.615),
    ("Al", "fcc", 4.05),
    ("Fe", "bcc", 2.87),
    ("W", "bcc", 3.16),
    ("NaCl", "rocksalt", 5.64),
    ("MgO", "rocksalt", 4.21),
    ("GaAs", "zincblende", 5.65),
]


def crystals(n: int, seed: int = 7) -> dict[str, Atoms]:
    """Return ``n`` small crystals by name: prototypes in turn, strained up to 3 %,
    some doubled along a, all rattled by 0.05 Å, from ``seed``."""
    rng = np.random.default_rng(seed)
    structures = {}
    for i in range(n):
        symbols, structure, a = PROTOTYPES[i % len(PROTOTYPES)]
        atoms = bulk(symbols, structure, a=a * rng.uniform(0.97, 1.03))
        if rng.random() < 0.5:
            atoms = atoms.repeat((2, 1, 1))
        atoms.rattle(0.05, seed=int(rng.integers(1 << 31)))
        structures[f"{i:04d}-{atoms.get_chemical_formula()}"] = atoms
    return structures


def bare_loop(structures: dict[str, Atoms], device: str, fmax: float, steps: int) -> dict:
    """Relax each structure with CHGNet's ASE calculator and BFGS; return energies by name."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    calc = CHGNetCalculator(CHGNet.load(verbose=False, use_device=device), use_device=device)
    energies = {}
    for name, structure in structures.items():
        atoms = structure.copy()
        atoms.calc = calc
        BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=fmax, steps=steps)
        energies[name] = float(atoms.get_potential_energy())
    return energies


def bare_process(folder: Path, args: argparse.Namespace) -> tuple[dict, float, float]:
    """Run :func:`bare_loop` on ``folder`` in a fresh process; return its energies by name,
    the loop's seconds and the whole process's seconds."""
    argv = [sys.executable, __file__, "--bare", str(folder), "--device", args.device]
    argv += ["--fmax", str(args.fmax), "--steps", str(args.steps)]
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    whole = time.perf_counter() - started
    report = json.loads(out.splitlines()[-1])
    return report["energies"], report["seconds"], whole


def bare_main(folder: Path, args: argparse.Namespace) -> None:
    """Relax the crystals of ``folder`` with :func:`bare_loop`; print energies and seconds."""
    from ase.io import read

    structures = {path.stem: read(path) for path in sorted(folder.glob("*.extxyz"))}
    started = time.perf_counter()
    energies = bare_loop(structures, args.device, args.fmax, args.steps)
    seconds = time.perf_counter() - started
    print(json.dumps({"energies": energies, "seconds": seconds}))


def atomforge_screen(folder: Path, params: object) -> tuple[dict, int]:
    """Screen ``folder`` with ``params``; return energies by name and the number completed."""
    from atomforge.flows.models import StructureSource
    from atomforge.flows.screen import screen
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import iter_results

    report = asyncio.run(screen(StructureSource(path=str(folder)), params))
    root = get_settings().resolved_results_root()
    energies = {r.name: r.energy_eV for r in iter_results(root, report.flow_run_id) if r.ok}
    return energies, report.n_completed


def main() -> None:
    """Run both ways ``--repeat`` times, alternating, and print the median figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="number of crystals")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--bare", type=Path, help="only run the bare loop on this folder")
    args = parser.parse_args()
    if args.bare:
        return bare_main(args.bare, args)
    os.environ["ATOMFORGE_DASK_WORKERS"] = str(args.workers)
    os.environ["ATOMFORGE_REUSE"] = "false"  # every round computes
    os.environ.setdefault("ATOMFORGE_HOME", tempfile.mkdtemp(prefix="atomforge-bench-"))
    Path(os.environ["ATOMFORGE_HOME"]).mkdir(parents=True, exist_ok=True)

    from atomforge.engines.structures import to_extxyz
    from atomforge.flows.models import StructureSource, make_parameters
    from atomforge.flows.simulate import simulate

    structures = crystals(args.n)
    folder = Path(tempfile.mkdtemp(prefix="chgnet-crystals-", dir=os.environ["ATOMFORGE_HOME"]))
    for name, atoms in structures.items():
        write(folder / f"{name}.extxyz", atoms, format="extxyz")
    params = make_parameters(
        "chgnet",
        kind="optimize",
        relax_cell=True,
        fmax=args.fmax,
        max_steps=args.steps,
        options={"device": args.device},
    )
    warm = next(iter(structures.values()))
    asyncio.run(simulate(StructureSource(text=to_extxyz(warm)), params))  # server, imports

    bare_times, whole_times, forge_times = [], [], []
    for _ in range(args.repeat):
        bare, seconds, whole = bare_process(folder, args)
        bare_times.append(seconds)
        whole_times.append(whole)

        started = time.perf_counter()
        forge, n_completed = atomforge_screen(folder, params)
        forge_times.append(time.perf_counter() - started)

    differences = [abs(forge[name] - bare[name]) / len(structures[name]) for name in forge]
    bare_seconds, forge_seconds = median(bare_times), median(forge_times)
    print(
        f"crystals: {args.n} (1-4 atoms), CHGNet on {args.device}, {args.workers} workers, "
        f"BFGS + FrechetCellFilter, fmax {args.fmax}, at most {args.steps} steps"
    )
    print(f"median of {args.repeat} rounds (min in brackets)")
    print(
        f"bare CHGNetCalculator loop: {bare_seconds:8.2f} s [{min(bare_times):.2f}] "
        f"(whole process with imports: {median(whole_times):.2f} s)"
    )
    print(
        f"atomforge screen:           {forge_seconds:8.2f} s [{min(forge_times):.2f}] "
        f"({n_completed} of {args.n} completed)"
    )
    print(f"ratio atomforge / bare:     {forge_seconds / bare_seconds:8.3f}")
    print(f"per structure: bare {bare_seconds / args.n * 1000:.1f} ms, ", end="")
    print(f"atomforge {forge_seconds / args.n * 1000:.1f} ms")
    print(f"largest energy difference:  {max(differences, default=0.0):.2e} eV/atom")


if __name__ == "__main__":
    sys.exit(main())
