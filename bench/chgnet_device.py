"""Benchmark for a GPU machine: CHGNet relaxations through atomforge's engine run loop
against a bare loop over CHGNet's ASE calculator, on the CPU and on CUDA.

What runs is atomforge's engine layer (``atomforge.engines``: the one run loop, a runner
process that loads the model once and relaxes its whole chunk), the part that touches the
device; Prefect and Dask stay out, since a machine without them can run this with only
atomforge's engines, ASE, pydantic and chgnet importable. ``bench/chgnet_screen.py`` is the
whole-flow benchmark. Run: ``python bench/chgnet_device.py [--n 100] [--devices cpu,cuda]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from ase.io import write

sys.path.insert(0, str(Path(__file__).parent))
from chgnet_screen import bare_loop, crystals


def engine_loop(structures: dict, device: str, fmax: float, steps: int) -> dict:
    """Relax ``structures`` with atomforge's chgnet engine in one runner; return energies.

    The runner gets every core as OpenMP threads, as torch gives the bare loop."""
    from atomforge.engines import get_engine, make_parameters
    from atomforge.engines.base import STRUCTURE_FILE
    from atomforge.engines.runloop import RunControl, run_jobs

    engine = get_engine("chgnet")
    params = make_parameters(
        "chgnet",
        relax_cell=True,
        fmax=fmax,
        max_steps=steps,
        cores=os.cpu_count() or 1,
        options={"device": device},
    )
    root = Path(tempfile.mkdtemp(prefix="chgnet-engine-"))
    directories = []
    for name, atoms in structures.items():
        directory = root / name
        directory.mkdir()
        write(directory / STRUCTURE_FILE, atoms, format="extxyz")
        engine.write_inputs(atoms, params, directory)
        directories.append(directory)
    control = RunControl(root / "pids", root / "stop", lambda text: None, lambda d, s: None, 0)
    run_jobs(engine, directories, params, control)
    return {d.name: engine.read_results(d, params).energy for d in directories}


def main() -> None:
    """Time both ways on each device and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    structures = crystals(args.n)
    print(f"{args.n} crystals relaxed with their cells, fmax {args.fmax}, CHGNet 0.3.0")
    print(f"{'device':<7} {'bare loop':>10} {'atomforge':>10} {'ratio':>6} {'max dE':>8}")
    for device in args.devices.split(","):
        started = time.perf_counter()
        bare = bare_loop(structures, device, args.fmax, args.steps)
        bare_seconds = time.perf_counter() - started
        started = time.perf_counter()
        forge = engine_loop(structures, device, args.fmax, args.steps)
        forge_seconds = time.perf_counter() - started
        worst = max(abs(bare[name] - forge[name]) for name in bare)
        print(
            f"{device:<7} {bare_seconds:9.2f}s {forge_seconds:9.2f}s "
            f"{forge_seconds / bare_seconds:6.2f} {worst:8.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
