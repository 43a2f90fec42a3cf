"""Benchmark: rerunning a finished screen, which reuses every stored result.

Screens the closed-shell G2 molecules, ``--copies`` rattled copies of each (fixed seed),
with GFN2-xTB optimization, then runs the same screen again, and prints both times and
their ratio (the rerun computes nothing: every structure's result is reused). Run:
``.venv/bin/python bench/rerun_screen.py [--copies 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from ase.io import write


def main() -> None:
    """Run a screen, then the same screen again, and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10, help="rattled copies per molecule")
    args = parser.parse_args()
    os.environ.setdefault("ATOMFORGE_HOME", tempfile.mkdtemp(prefix="atomforge-bench-"))
    Path(os.environ["ATOMFORGE_HOME"]).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from g2_screen import closed_shell_g2, rattled_copies

    from atomforge.flows.models import StructureSource, make_parameters
    from atomforge.flows.screen import screen
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import iter_results

    frames = []
    for name, atoms in rattled_copies(closed_shell_g2(), args.copies):
        atoms.info["name"] = name
        frames.append(atoms)
    source = (
        Path(tempfile.mkdtemp(prefix="g2-copies-", dir=os.environ["ATOMFORGE_HOME"])) / "g2.extxyz"
    )
    write(source, frames, format="extxyz")
    params = make_parameters("xtb")

    times, reports = [], []
    for _ in range(2):
        started = time.perf_counter()
        reports.append(asyncio.run(screen(StructureSource(path=str(source)), params)))
        times.append(time.perf_counter() - started)
    root = get_settings().resolved_results_root()
    reused = sum(bool(r.reused_from) for r in iter_results(root, reports[1].flow_run_id))
    print(f"structures: {len(frames)} (closed-shell G2 x {args.copies} rattled copies), xtb")
    print(f"first screen:  {times[0]:8.2f} s ({reports[0].n_completed} completed)")
    print(f"rerun:         {times[1]:8.2f} s ({reports[1].n_completed} completed, {reused} reused)")
    print(f"rerun / first: {times[1] / times[0]:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
