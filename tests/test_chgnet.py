"""The chgnet engine: real CHGNet (the model shipped in the chgnet wheel) on CPU, no mocks.

References: CHGNet's own ASE calculator (``chgnet.model.dynamics.CHGNetCalculator``) run
directly on the same structures gives the energy, forces, stress and magnetic moments; the
experimental lattice constants of Si diamond (5.431 Å) and Cu fcc (3.615 Å) are what a
relaxed cell must land within 2 % of (CHGNet learned PBE, which overestimates both by
about 1 %).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from io import StringIO
from pathlib import Path

import numpy as np
import psutil
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import read, write

from atomforge.engines import get_engine
from atomforge.engines.ase_md import run_md
from atomforge.engines.base import STRUCTURE_FILE
from atomforge.engines.errors import InputError, RunStopped
from atomforge.engines.md_options import MdOptions
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.runloop import RunControl, run_jobs
from atomforge.engines.status import Status
from atomforge.engines.structures import to_extxyz
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.screen import screen
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import iter_results
from atomforge.flows.validation import check_inputs

pytest.importorskip("chgnet", reason="the ml extra (torch, chgnet) is not installed")

SI_A, CU_A = 5.431, 3.615
THERMO_KEYS = {
    "step",
    "time_ps",
    "temperature_K",
    "potential_energy_eV",
    "kinetic_energy_eV",
    "total_energy_eV",
    "pressure_bar",
    "volume_A3",
}
"""The columns of the lammps engine's md thermo table, which chgnet's keeps."""


def _crystals() -> dict[str, Atoms]:
    """Return small rattled crystals: a strained Si supercell, magnetic Fe, rock salt."""
    si = bulk("Si", "diamond", a=5.35, cubic=True)
    fe = bulk("Fe", "bcc", a=2.87, cubic=True).repeat((2, 1, 1))
    nacl = bulk("NaCl", "rocksalt", a=5.5)
    for seed, atoms in enumerate((si, fe, nacl)):
        atoms.rattle(0.05, seed=seed)
    return {"si": si, "fe": fe, "nacl": nacl}


def _screen(tmp_path: Path, structures: dict[str, Atoms], **params) -> dict:
    """Return the result documents, by name, of a chgnet screen of ``structures``."""
    folder = tmp_path / "crystals"
    folder.mkdir()
    for name, atoms in structures.items():
        write(folder / f"{name}.extxyz", atoms, format="extxyz")
    source = StructureSource(path=str(folder))
    report = asyncio.run(screen(source, make_parameters("chgnet", **params)))
    root = get_settings().resolved_results_root()
    return {r.name: r for r in iter_results(root, report.flow_run_id)}


@pytest.fixture(scope="module")
def singlepoints(tmp_path_factory) -> dict:
    """Return the documents of a singlepoint screen of :func:`_crystals` (one batch)."""
    return _screen(tmp_path_factory.mktemp("sp"), _crystals(), kind="singlepoint")


@pytest.mark.parametrize("name", ["si", "fe", "nacl"])
def test_batched_singlepoint_equals_chgnets_own_calculator(singlepoints, name):
    from chgnet.model.dynamics import CHGNetCalculator

    result = singlepoints[name]
    assert result.status == "completed", result.message
    assert result.engine_version.startswith("chgnet ")
    atoms = _crystals()[name]
    atoms.calc = CHGNetCalculator(use_device="cpu")
    n = len(atoms)
    assert result.energy_eV / n == pytest.approx(atoms.get_potential_energy() / n, abs=1e-5)
    assert np.abs(np.array(result.forces_eV_per_A) - atoms.get_forces()).max() < 1e-4
    assert np.abs(np.array(result.stress_eV_per_A3) - atoms.get_stress()).max() < 1e-5
    assert np.abs(np.array(result.magnetic_moments) - atoms.get_magnetic_moments()).max() < 1e-4
    final = read(StringIO(result.final_structure), format="extxyz")
    assert np.allclose(final.positions, atoms.positions)


def test_iron_is_magnetic_and_silicon_is_not(singlepoints):
    assert min(singlepoints["fe"].magnetic_moments) > 1.5
    assert max(singlepoints["si"].magnetic_moments) < 0.1


def test_relaxed_si_and_cu_cells_are_within_two_percent_of_experiment(tmp_path):
    si = bulk("Si", "diamond", a=5.30)
    cu = bulk("Cu", "fcc", a=3.50)
    si.rattle(0.02, seed=1)
    results = _screen(tmp_path, {"si": si, "cu": cu}, kind="optimize", relax_cell=True)
    for name, experiment in (("si", SI_A), ("cu", CU_A)):
        result = results[name]
        assert result.status == "completed", result.message
        assert result.converged is True
        final = read(StringIO(result.final_structure), format="extxyz")
        a = final.cell.cellpar()[0] * np.sqrt(2)
        assert a == pytest.approx(experiment, rel=0.02), name
        assert abs(result.pressure_GPa) < 0.1


def _run_engine(
    tmp_path: Path,
    structures: list[Atoms],
    params: CalculationParameters,
    stop_when: Callable[[], bool] | None = None,
) -> dict:
    """Run the chgnet engine's run loop (one runner process) on ``structures``.

    Returns the final statuses by directory name (``job0``, ...), and ``stopped`` when the
    loop raised RunStopped. ``stop_when()``, polled from a thread while the loop runs,
    makes it create the stop file once it returns True.
    """
    engine = get_engine("chgnet")
    directories = []
    for i, atoms in enumerate(structures):
        directory = tmp_path / f"job{i}"
        directory.mkdir()
        write(directory / STRUCTURE_FILE, atoms, format="extxyz")
        engine.write_inputs(atoms, params, directory)
        directories.append(directory)
    statuses: dict = {}
    control = RunControl(
        pid_dir=tmp_path / "pids",
        stop_file=tmp_path / "stop",
        log=lambda text: None,
        on_done=lambda directory, status: statuses.__setitem__(directory.name, status),
    )
    done = threading.Event()
    if stop_when is not None:
        args = (control.stop_file, stop_when, done)
        threading.Thread(target=_stop_once, args=args, daemon=True).start()
    try:
        run_jobs(engine, directories, params, control)
    except RunStopped:
        statuses["stopped"] = True
    finally:
        done.set()
    return statuses


def _stop_once(stop_file: Path, condition: Callable[[], bool], done: threading.Event) -> None:
    """Create ``stop_file`` once ``condition()`` holds, unless ``done`` is set first."""
    while not done.is_set():
        if condition():
            stop_file.touch()
            return
        time.sleep(0.1)


def test_nvt_md_writes_the_lammps_thermo_table_and_a_trajectory(tmp_path):
    atoms = bulk("Cu", "fcc", a=CU_A, cubic=True)
    options = {"ensemble": "nvt", "temperature": 300, "steps": 10, "thermo_every": 5}
    params = make_parameters("chgnet", kind="md", options=options)
    status = _run_engine(tmp_path, [atoms], params)["job0"]
    assert status.status is Status.completed, status.message
    result = get_engine("chgnet").read_results(tmp_path / "job0", params)
    assert result.n_steps == 10
    thermo = result.properties["thermo"]
    assert set(thermo) == THERMO_KEYS
    assert thermo["step"] == [0, 5, 10]
    assert thermo["time_ps"][-1] == pytest.approx(0.01)
    assert thermo["temperature_K"][0] == pytest.approx(300, abs=1e-6)
    frames = read(tmp_path / "job0" / "trajectory.extxyz", index=":")
    assert len(frames) == 3
    assert [f.get_potential_energy() for f in frames] == pytest.approx(
        thermo["potential_energy_eV"]
    )
    assert result.energy == pytest.approx(thermo["potential_energy_eV"][-1])
    assert result.magmoms is not None and len(result.magmoms) == 4


def test_npt_md_of_the_shared_runner_changes_the_volume_and_ends_with_the_last_step():
    atoms = bulk("Cu", "fcc", a=3.50).repeat(3)
    atoms.calc = EMT()
    options = MdOptions(ensemble="npt", temperature=300, pressure=0, steps=42, thermo_every=10)
    thermo = run_md(atoms, options, lambda: None)
    assert thermo["step"] == [0, 10, 20, 30, 40, 42]
    assert thermo["volume_A3"][-1] > thermo["volume_A3"][0] * 1.005
    assert thermo["pressure_bar"][0] > 1000


def _runner_processes(directory: Path) -> list[psutil.Process]:
    """Return the live ase_runner processes working on ``directory``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "atomforge.engines.ase_runner" in cmdline and str(directory) in cmdline:
            found.append(process)
    return found


def _big_silicon() -> Atoms:
    """Return a rattled 216-atom Si supercell: minutes of CHGNet optimization on a CPU."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(3)
    atoms.rattle(0.1, seed=4)
    return atoms


def test_timeout_then_stop_kill_the_calculation_and_leave_no_runner(tmp_path):
    params = make_parameters("chgnet", kind="optimize", relax_cell=True, timeout_seconds=12)
    second = tmp_path / "job1" / "opt.extxyz"

    def second_is_optimizing() -> bool:
        return second.exists() and second.stat().st_size > 0

    started = time.monotonic()
    statuses = _run_engine(tmp_path, [_big_silicon()] * 2, params, second_is_optimizing)
    assert statuses["job0"].status is Status.timeout
    assert statuses["job1"].status is Status.stopped
    assert statuses["stopped"] is True
    assert (tmp_path / "job0" / "opt.extxyz").stat().st_size > 0
    assert time.monotonic() - started < 60
    assert _runner_processes(tmp_path) == []
    assert list((tmp_path / "pids").glob("*.json")) == []


def test_molecules_and_slabs_are_refused_in_one_line():
    params = make_parameters("chgnet", kind="singlepoint")
    with pytest.raises(InputError, match="needs a periodic cell"):
        check_inputs(StructureSource(text=to_extxyz(molecule("H2O"))), params)
    slab = bulk("Cu", "fcc", a=CU_A, cubic=True)
    slab.pbc = (True, True, False)
    with pytest.raises(InputError, match="periodic in all three directions"):
        check_inputs(StructureSource(text=to_extxyz(slab)), params)


def test_md_without_a_temperature_is_refused():
    params = make_parameters("chgnet", kind="md", options={"ensemble": "nvt"})
    source = StructureSource(text=to_extxyz(bulk("Cu", "fcc", a=CU_A)))
    with pytest.raises(InputError, match="chgnet: ensemble nvt needs a temperature"):
        check_inputs(source, params)


def test_missing_ml_extra_is_named_in_one_line(monkeypatch):
    for module in ("torch", "chgnet"):
        monkeypatch.setitem(sys.modules, module, None)  # how Python marks one unimportable
    with pytest.raises(InputError) as info:
        get_engine("chgnet").check_installed(make_parameters("chgnet"))
    assert str(info.value) == (
        "chgnet: torch and chgnet not installed: pip install 'atomforge[ml]'"
    )


def test_importing_atomforge_does_not_import_torch_nor_mace():
    code = (
        "import sys; from atomforge.engines.registry import engine_classes, make_parameters; "
        "engine_classes(); make_parameters('chgnet'); make_parameters('mace'); "
        "print('torch' in sys.modules, 'mace' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr
