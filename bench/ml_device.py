"""Benchmark for a GPU machine: an ML potential (CHGNet or MACE) through atomforge's engine
layer against a bare loop over the potential's own ASE calculator, on CUDA and the CPU.

What runs is atomforge's engine layer (``atomforge.engines``: the one run loop, a runner
process that loads the model once and computes its whole chunk), the part that touches the
device; Prefect and Dask stay out, so a machine needs only atomforge's engines, ASE,
pydantic, pydantic-settings, psutil, torch and the potential's package.
``bench/chgnet_screen.py`` is the whole-flow benchmark. The same structures go both ways:

- ``relax``: ``--n`` crystals of 1-4 atoms (``chgnet_screen.crystals``) relaxed with their
  cells (BFGS on a FrechetCellFilter) to ``--fmax`` in at most ``--steps`` steps (for
  MACE by default a force nobody reaches, so every crystal takes exactly ``--steps``);
- ``md`` (with ``--md-cells``): supercells of about ``--md-atoms`` atoms of the same
  prototypes, ``--md-steps`` NVT steps at 300 K (the md kind's Nose-Hoover chain, 1 fs).

The bare loop runs in this process on one calculator, its model load included (imports and
the device's context are set up before its clock starts); atomforge's time is the whole
run loop, its runner process's start, imports, device context and model load included.
The largest energy difference between the two ways is printed (eV, per structure).

CHGNet runs its shipped model 0.3.0. MACE ships none and none can be downloaded here, so
``--engine mace`` builds one with mace-torch's own classes: a ScaleShiftMACE shaped like
MACE-MP-0 (``--mace-model small``: 128x0e, ``medium``: 128x0e + 128x1o; max_ell 3,
correlation 3, 2 interactions, r_max 6 A, 10 Bessel functions, MLP 16x0e, ZBL pair
repulsion as in MACE-MP-0b) for the elements of the structures, with seeded random
weights: its timings are those of a model of that size, its energies mean nothing.
Run: ``python bench/ml_device.py --engine chgnet|mace [--n 60] [--devices cuda,cpu]``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import Calculator
from ase.filters import FrechetCellFilter
from ase.io import write
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.optimize import BFGS

sys.path.insert(0, str(Path(__file__).parent))
from chgnet_screen import PROTOTYPES, crystals

MD_TEMPERATURE = 300.0
"""Kelvin, for the md workload's initial velocities and thermostat."""
MD_SEED = 12345
"""The md kind's default seed of the initial velocities (the bare loop uses it too)."""
DEFAULT_RELAX = {"chgnet": (0.05, 200), "mace": (1e-6, 30)}
"""fmax (eV/A) and step limit of the relax workload by engine, unless given."""
MACE_SIZES = {"small": ("0e",), "medium": ("0e", "1o")}
"""The hidden irreps of the MACE-MP-0 sizes, each with ``--channels`` channels."""
IMPORTS = {"chgnet": "chgnet.model.dynamics", "mace": "mace.calculators"}
"""What the calculator of each engine imports (timed in a fresh process, for reference)."""

Results = dict[str, tuple[float, int]]
"""Energy (eV) and steps taken, by structure name."""


def supercells(n: int, atoms: int, seed: int = 11) -> dict[str, Atoms]:
    """Return ``n`` supercells of about ``atoms`` atoms by name: the cubic cells of the
    prototypes in turn, repeated alike in each direction, rattled by 0.05 A, from ``seed``."""
    rng = np.random.default_rng(seed)
    cells = {}
    for i in range(n):
        symbols, structure, a = PROTOTYPES[i % len(PROTOTYPES)]
        unit = bulk(symbols, structure, a=a, cubic=True)
        cell = unit.repeat(max(1, round((atoms / len(unit)) ** (1 / 3))))
        cell.rattle(0.05, seed=int(rng.integers(1 << 31)))
        cells[f"{i:04d}-{cell.get_chemical_formula()}"] = cell
    return cells


def save_mace_model(path: Path, size: str, channels: int, numbers: list[int]) -> Path:
    """Save a float64 ScaleShiftMACE shaped like MACE-MP-0 ``size``, for ``numbers``, with
    seeded random weights, at ``path`` (as mace-torch's training saves one)."""
    import torch
    from e3nn import o3
    from mace import modules
    from mace.tools.torch_tools import default_dtype

    torch.manual_seed(7)
    rng = np.random.default_rng(7)
    hidden = " + ".join(f"{channels}x{irrep}" for irrep in MACE_SIZES[size])
    with default_dtype(torch.float64):
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        model = modules.ScaleShiftMACE(
            r_max=6.0,
            num_bessel=10,
            num_polynomial_cutoff=5,
            max_ell=3,
            interaction_cls=block,
            interaction_cls_first=block,
            num_interactions=2,
            num_elements=len(numbers),
            hidden_irreps=o3.Irreps(hidden),
            MLP_irreps=o3.Irreps("16x0e"),
            gate=torch.nn.functional.silu,
            atomic_energies=-rng.uniform(1.0, 8.0, len(numbers)),
            avg_num_neighbors=40.0,
            atomic_numbers=numbers,
            correlation=3,
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
            pair_repulsion=True,
        )
    torch.save(model, path)
    return path


def bare_calculator(engine: str, device: str, model: str, dtype: str) -> Calculator:
    """Return the potential's own ASE calculator on ``device``, its model loaded now."""
    if engine == "chgnet":
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        with redirect_stdout(io.StringIO()):  # as the engine does: no banner per load
            chgnet = CHGNet.load(verbose=False, use_device=device)
            return CHGNetCalculator(chgnet, use_device=device)
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=model, device=device, default_dtype=dtype)


def engine_options(engine: str, device: str, model: str, dtype: str) -> dict:
    """Return the atomforge engine options that run what :func:`bare_calculator` runs."""
    if engine == "chgnet":
        return {"device": device}
    return {"device": device, "model": model, "dtype": dtype}


def relax_bare(structures: dict[str, Atoms], calc: Calculator, fmax: float, steps: int) -> Results:
    """Relax each structure with its cell (BFGS on a FrechetCellFilter) on ``calc``."""
    results = {}
    for name, structure in structures.items():
        atoms = structure.copy()
        atoms.calc = calc
        optimizer = BFGS(FrechetCellFilter(atoms), logfile=None)
        optimizer.run(fmax=fmax, steps=steps)
        results[name] = (float(atoms.get_potential_energy()), optimizer.nsteps)
    return results


def md_bare(structures: dict[str, Atoms], calc: Calculator, steps: int) -> Results:
    """Run ``steps`` NVT steps on each structure as atomforge's md kind runs them: velocities
    from :data:`MD_SEED` without net momentum, a Nose-Hoover chain damped over 100 steps."""
    results = {}
    dt = 1.0 * units.fs
    for name, structure in structures.items():
        atoms = structure.copy()
        atoms.calc = calc
        rng = np.random.default_rng(MD_SEED)
        thermalize_momenta(atoms, MD_TEMPERATURE, exact_temperature=True, rng=rng)
        Stationary(atoms, preserve_temperature=True)
        NoseHooverChainNVT(
            atoms, timestep=dt, temperature_K=MD_TEMPERATURE, tdamp=100 * dt, logfile=None
        ).run(steps)
        results[name] = (float(atoms.get_potential_energy()), steps)
    return results


def engine_loop(engine: str, structures: dict[str, Atoms], params: object) -> Results:
    """Compute ``structures`` with atomforge's ``engine`` run loop, in one runner process.

    No correction reruns (a relaxation that runs out of steps is not continued), so both
    ways take the same steps."""
    from atomforge.engines import get_engine
    from atomforge.engines.ase_engine import RESULTS_FILE
    from atomforge.engines.base import STRUCTURE_FILE
    from atomforge.engines.runloop import RunControl, run_jobs

    adapter = get_engine(engine)
    root = Path(tempfile.mkdtemp(prefix=f"{engine}-engine-"))
    directories = []
    for name, atoms in structures.items():
        directory = root / name
        directory.mkdir()
        write(directory / STRUCTURE_FILE, atoms, format="extxyz")
        adapter.write_inputs(atoms, params, directory)
        directories.append(directory)
    statuses = {}
    control = RunControl(
        root / "pids", root / "stop", lambda text: None, statuses.__setitem__, max_corrections=0
    )
    run_jobs(adapter, directories, params, control)
    results = {}
    for directory in directories:
        if not (directory / RESULTS_FILE).exists():
            raise RuntimeError(f"{directory.name}: {statuses[directory].message}")
        result = adapter.read_results(directory, params)
        results[directory.name] = (result.energy, result.n_steps)
    return results


def fresh_process_seconds(engine: str, device: str) -> float:
    """Return how long a fresh interpreter takes to import torch and the calculator's
    package and set up ``device`` (what atomforge's runner pays before its first model)."""
    code = f"import torch, {IMPORTS[engine]}; torch.zeros(1, device={device!r})"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def parameters(args: argparse.Namespace, kind: str, options: dict, cores: int) -> object:
    """Return atomforge's parameters for workload ``kind`` with engine ``options``."""
    from atomforge.engines import make_parameters

    if kind == "relax":
        return make_parameters(
            args.engine,
            kind="optimize",
            relax_cell=True,
            fmax=args.fmax,
            max_steps=args.steps,
            cores=cores,
            options=options,
        )
    md = {"ensemble": "nvt", "temperature": MD_TEMPERATURE, "steps": args.md_steps}
    md["thermo_every"] = args.md_steps
    return make_parameters(args.engine, kind="md", cores=cores, options=options | md)


def measure(
    args: argparse.Namespace, kind: str, cells: dict[str, Atoms], model: str, device: str
) -> tuple[float, float, float, int, int]:
    """Run workload ``kind`` on ``cells`` both ways on ``device``; return the bare and the
    atomforge seconds, the largest energy difference and the steps each took."""
    import torch

    torch.zeros(1, device=device)  # the device's context, before the clock
    options = engine_options(args.engine, device, model, args.dtype)
    params = parameters(args, kind, options, torch.get_num_threads())
    started = time.perf_counter()
    calc = bare_calculator(args.engine, device, model, args.dtype)
    if kind == "relax":
        bare = relax_bare(cells, calc, args.fmax, args.steps)
    else:
        bare = md_bare(cells, calc, args.md_steps)
    bare_seconds = time.perf_counter() - started
    del calc
    started = time.perf_counter()
    forge = engine_loop(args.engine, cells, params)
    forge_seconds = time.perf_counter() - started
    worst = max(abs(bare[name][0] - forge[name][0]) for name in bare)
    steps = [sum(n for _, n in results.values()) for results in (bare, forge)]
    return bare_seconds, forge_seconds, worst, *steps


def main() -> None:
    """Time both ways for each model, workload and device, and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="chgnet", choices=sorted(DEFAULT_RELAX))
    parser.add_argument("--n", type=int, default=60, help="crystals relaxed (0: none)")
    parser.add_argument("--devices", default="cuda,cpu")
    parser.add_argument("--fmax", type=float, help="default: 0.05 (chgnet), 1e-6 (mace)")
    parser.add_argument("--steps", type=int, help="default: 200 (chgnet), 30 (mace)")
    parser.add_argument("--md-cells", type=int, default=0, help="supercells run as MD")
    parser.add_argument("--md-atoms", type=int, default=216)
    parser.add_argument("--md-steps", type=int, default=20)
    parser.add_argument("--mace-model", default="medium", help="small, medium or both: a,b")
    parser.add_argument("--channels", type=int, default=128, help="MACE channels")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = parser.parse_args()
    fmax, steps = DEFAULT_RELAX[args.engine]
    args.fmax, args.steps = args.fmax or fmax, args.steps or steps

    import torch

    importlib.import_module(IMPORTS[args.engine])  # imported before any clock starts
    warnings.simplefilter("ignore", UserWarning)  # mace-torch's torch.load and TorchScript
    workloads = {}
    if args.n:
        workloads[f"relax {args.n} x {args.steps}"] = ("relax", crystals(args.n))
    if args.md_cells:
        cells = supercells(args.md_cells, args.md_atoms)
        workloads[f"md {args.md_cells} x {args.md_steps}"] = ("md", cells)
    structures = [a for _, cells in workloads.values() for a in cells.values()]
    numbers = sorted({int(z) for atoms in structures for z in atoms.numbers})
    models = {"0.3.0": ""}
    if args.engine == "mace":
        folder = Path(tempfile.mkdtemp(prefix="mace-models-"))
        models = {
            f"{size} {args.channels}ch": str(
                save_mace_model(folder / f"{size}.model", size, args.channels, numbers)
            )
            for size in args.mace_model.split(",")
        }

    devices = args.devices.split(",")
    threads = torch.get_num_threads()
    print(f"{args.engine}: torch {torch.__version__}, {threads} CPU threads both ways", end="")
    print(f", {torch.cuda.get_device_name()}" if "cuda" in devices else "")
    for workload, (kind, cells) in workloads.items():
        sizes = sorted({len(atoms) for atoms in cells.values()})
        what = f"cells relaxed to fmax {args.fmax} in at most {args.steps} steps"
        if kind == "md":
            what = f"NVT steps at {MD_TEMPERATURE:g} K"
        print(f"{workload}: {len(cells)} structures of {sizes[0]}-{sizes[-1]} atoms, {what}")
    if args.engine == "mace":
        print(f"MACE-MP-0-shaped models, random weights, {args.dtype}, elements {numbers}")
    for device in devices:
        seconds = fresh_process_seconds(args.engine, device)
        print(f"fresh process importing torch and {IMPORTS[args.engine]}, {device}: {seconds:.2f}s")
    print(
        f"{'workload':<16} {'model':<12} {'device':<6} {'bare loop':>10} {'atomforge':>10} "
        f"{'ratio':>6} {'max dE':>8} {'steps':>11} {'bare ms/step':>12}"
    )
    for label, model in models.items():
        for workload, (kind, cells) in workloads.items():
            for device in devices:
                bare, forge, worst, bare_steps, forge_steps = measure(
                    args, kind, cells, model, device
                )
                print(
                    f"{workload:<16} {label:<12} {device:<6} {bare:9.2f}s {forge:9.2f}s "
                    f"{forge / bare:6.2f} {worst:8.1e} {bare_steps:>5}/{forge_steps:<5} "
                    f"{bare / bare_steps * 1000:12.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
