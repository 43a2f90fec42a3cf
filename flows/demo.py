"""The main job: optimize water with xtb, then screen a few small molecules, and print both."""

from __future__ import annotations

from pathlib import Path

from ase.build import molecule
from ase.io import write

from atomforge.engines.structures import to_extxyz
from atomforge.flows.models import RunOptions, StructureSource, make_parameters
from atomforge.flows.settings import get_settings

DEMO_MOLECULES = ("H2O", "NH3", "CH4", "CO2", "C2H4", "HCN")


def write_demo_set(folder: Path) -> Path:
    """Write a few G2 molecules as xyz files into ``folder``; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in DEMO_MOLECULES:
        write(folder / f"{name}.xyz", molecule(name), format="xyz")
    return folder


def run_demo() -> int:
    """Run the water optimization and the screening on the current Prefect API (Ctrl-C
    cancels the run going on, as for run and screen); return 0."""
    from atomforge.flows.cli import print_results, run_flow
    from atomforge.flows.screen import screen
    from atomforge.flows.simulate import simulate

    water = StructureSource(text=to_extxyz(molecule("H2O")))
    result = run_flow(simulate(water, make_parameters(engine="xtb"), RunOptions()))
    print("\n== water, GFN2-xTB optimization (xtb)")
    print_results([result])
    print("   reference: -5.070544 Eh, gap 14.386 eV (xtb 6.5.1 / tblite 0.8.0)")
    folder = write_demo_set(get_settings().resolved_work_root() / "demo-molecules")
    report = run_flow(screen(StructureSource(path=str(folder)), make_parameters(engine="xtb")))
    print(f"\n== screening of {len(DEMO_MOLECULES)} molecules, ranked by {report.rank_by}")
    print_results(report.results)
    print(f"\nresults stored under {get_settings().resolved_results_root()}")
    return 0
