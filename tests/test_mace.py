"""The mace engine: a real MACE model file run by atomforge, on CPU, no mocks.

No pretrained MACE model is available offline, so the tests build a small one with
mace-torch's own classes (``ScaleShiftMACE`` for H, O, Si and Cu, seeded random weights,
ZBL pair repulsion) and save it with ``torch.save``, as mace-torch's training does.
Reference: mace-torch's own calculator (``mace.calculators.MACECalculator`` loading that
file with ``model_paths=``) on the same structures gives the energy, forces and stress,
and, driven by the same ASE optimizer, the relaxed structure.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.optimize import BFGS

from atomforge.engines import get_engine
from atomforge.engines.base import STRUCTURE_FILE
from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.runloop import RunControl, run_jobs
from atomforge.engines.status import JobStatus, Status
from atomforge.engines.structures import to_extxyz
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.screen import screen
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import iter_results
from atomforge.flows.validation import check_inputs

pytest.importorskip("mace", reason="the ml extra (torch, mace-torch) is not installed")

ELEMENTS = [1, 8, 14, 29]
"""What the test model covers: H, O, Si, Cu."""


def _save_small_mace_model(path: Path) -> Path:
    """Save a small float64 ScaleShiftMACE with seeded random weights at ``path``."""
    import torch
    from e3nn import o3
    from mace import modules
    from mace.tools.torch_tools import default_dtype

    torch.manual_seed(7)
    with default_dtype(torch.float64):
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        model = modules.ScaleShiftMACE(
            r_max=4.0,
            num_bessel=4,
            num_polynomial_cutoff=3,
            max_ell=2,
            interaction_cls=block,
            interaction_cls_first=block,
            num_interactions=2,
            num_elements=len(ELEMENTS),
            hidden_irreps=o3.Irreps("8x0e + 8x1o"),
            MLP_irreps=o3.Irreps("8x0e"),
            gate=torch.nn.functional.silu,
            atomic_energies=np.array([-1.0, -2.0, -5.0, -4.0]),
            avg_num_neighbors=8.0,
            atomic_numbers=ELEMENTS,
            correlation=2,
            atomic_inter_scale=10.0,
            atomic_inter_shift=0.0,
            pair_repulsion=True,
        )
    torch.save(model, path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """Return the path of the small MACE model file (built once for the module)."""
    return _save_small_mace_model(tmp_path_factory.mktemp("model") / "small.model")


def _structures() -> dict[str, Atoms]:
    """Return rattled Si and Cu crystals and a water molecule."""
    si = bulk("Si", "diamond", a=5.43)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    for seed, atoms in enumerate((si, cu)):
        atoms.rattle(0.1, seed=seed)
    return {"si": si, "cu": cu, "water": molecule("H2O")}


def _own_calculator(model_file: Path):
    """Return mace-torch's own calculator on ``model_file`` (the reference)."""
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(model_file), device="cpu", default_dtype="float64")


@pytest.fixture(scope="module")
def singlepoints(model_file, tmp_path_factory) -> dict:
    """Return the result documents, by name, of a mace singlepoint screen of _structures()."""
    folder = tmp_path_factory.mktemp("sp")
    for name, atoms in _structures().items():
        write(folder / f"{name}.extxyz", atoms, format="extxyz")
    params = make_parameters("mace", kind="singlepoint", options={"model": str(model_file)})
    report = asyncio.run(screen(StructureSource(path=str(folder)), params))
    root = get_settings().resolved_results_root()
    return {r.name: r for r in iter_results(root, report.flow_run_id)}


@pytest.mark.parametrize("name", ["si", "cu", "water"])
def test_singlepoint_equals_mace_torchs_own_calculator(singlepoints, model_file, name):
    result = singlepoints[name]
    assert result.status == "completed", result.message
    assert result.engine_version.startswith("mace-torch ")
    atoms = _structures()[name]
    atoms.calc = _own_calculator(model_file)
    assert result.energy_eV == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
    assert np.abs(np.array(result.forces_eV_per_A) - atoms.get_forces()).max() < 1e-6
    if atoms.pbc.all():
        assert np.abs(np.array(result.stress_eV_per_A3) - atoms.get_stress()).max() < 1e-7
    else:
        assert result.stress_eV_per_A3 is None and result.pressure_GPa is None
    final = read(StringIO(result.final_structure), format="extxyz")
    assert np.allclose(final.positions, atoms.positions)


def _run_engine(tmp_path: Path, atoms: Atoms, params: CalculationParameters) -> JobStatus:
    """Run the mace engine's run loop (one runner process) on ``atoms`` in ``tmp_path/job``."""
    engine = get_engine("mace")
    directory = tmp_path / "job"
    directory.mkdir()
    write(directory / STRUCTURE_FILE, atoms, format="extxyz")
    engine.write_inputs(atoms, params, directory)
    statuses: dict[str, JobStatus] = {}
    control = RunControl(
        pid_dir=tmp_path / "pids",
        stop_file=tmp_path / "stop",
        log=lambda text: None,
        on_done=lambda directory, status: statuses.__setitem__(directory.name, status),
    )
    run_jobs(engine, [directory], params, control)
    return statuses["job"]


def test_cell_relaxation_reaches_the_structure_mace_torchs_own_calculator_reaches(
    tmp_path, model_file
):
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.2, seed=1)
    options = {"model": str(model_file)}
    params = make_parameters("mace", kind="optimize", relax_cell=True, options=options)
    status = _run_engine(tmp_path, atoms, params)
    assert status.status is Status.completed, status.message
    result = get_engine("mace").read_results(tmp_path / "job", params)
    assert result.converged is True and result.n_steps > 5
    reference = read(tmp_path / "job" / "input.extxyz", format="extxyz")
    reference.calc = _own_calculator(model_file)
    optimizer = BFGS(FrechetCellFilter(reference), logfile=None)
    assert optimizer.run(fmax=params.fmax, steps=params.max_steps)
    assert result.n_steps == optimizer.nsteps
    assert result.energy == pytest.approx(reference.get_potential_energy(), abs=1e-6)
    assert np.allclose(result.atoms.cell, reference.cell, atol=1e-5)
    assert np.abs(result.forces).max() < params.fmax


def test_nvt_md_writes_the_thermo_table_and_a_trajectory(tmp_path, model_file):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    options = {"model": str(model_file), "temperature": 300, "steps": 10, "thermo_every": 5}
    params = make_parameters("mace", kind="md", options=options)
    status = _run_engine(tmp_path, atoms, params)
    assert status.status is Status.completed, status.message
    result = get_engine("mace").read_results(tmp_path / "job", params)
    thermo = result.properties["thermo"]
    assert thermo["step"] == [0, 5, 10]
    assert thermo["temperature_K"][0] == pytest.approx(300, abs=1e-6)
    frames = read(tmp_path / "job" / "trajectory.extxyz", index=":")
    assert [f.get_potential_energy() for f in frames] == pytest.approx(
        thermo["potential_energy_eV"]
    )


def _validate(model: str, atoms: Atoms | None = None) -> None:
    """Run validate's checks of a mace singlepoint with option ``model`` on ``atoms``."""
    params = make_parameters("mace", kind="singlepoint", options={"model": model})
    source = StructureSource(text=to_extxyz(atoms or bulk("Si", "diamond", a=5.43)))
    check_inputs(source, params)


def test_a_missing_model_file_is_refused_at_validate_in_one_line(tmp_path):
    with pytest.raises(InputError, match=r"^mace: model [^\n]*absent.model: no such model file$"):
        _validate(str(tmp_path / "absent.model"))


def test_no_model_file_given_is_refused_at_validate():
    with pytest.raises(InputError, match="mace: give a MACE model file: -o model=PATH"):
        _validate("")


def test_a_torch_file_that_is_no_mace_model_is_refused_at_validate_in_one_line(tmp_path):
    import torch

    linear = tmp_path / "linear.model"
    torch.save(torch.nn.Linear(2, 2), linear)
    with pytest.raises(InputError) as info:
        _validate(str(linear))
    assert str(info.value) == (
        f"mace: {linear} is not a MACE model file (it holds torch.nn.modules.linear.Linear)"
    )


def test_a_file_that_is_not_a_torch_file_is_refused_at_validate_in_one_line(tmp_path):
    text = tmp_path / "notes.model"
    text.write_text("not a model\n")
    with pytest.raises(InputError) as info:
        _validate(str(text))
    assert str(info.value) == f"mace: model {text}: not a torch-saved model (BadZipFile)"


def test_elements_the_model_does_not_cover_are_refused_at_validate(model_file):
    with pytest.raises(
        InputError, match=r"mace: the model does not cover Fe \(has: H, O, Si, Cu\)"
    ):
        _validate(str(model_file), bulk("Fe", "bcc", a=2.87))


def test_missing_mace_torch_is_named_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "mace", None)  # how Python marks a module unimportable
    with pytest.raises(InputError) as info:
        get_engine("mace").check_installed(make_parameters("mace"))
    assert str(info.value) == "mace: mace-torch not installed: pip install 'atomforge[ml]'"


def test_validating_a_mace_run_imports_neither_torch_nor_mace(model_file):
    code = (
        "import sys; from ase.build import bulk; "
        "from atomforge.flows.models import StructureSource, make_parameters; "
        "from atomforge.engines.structures import to_extxyz; "
        "from atomforge.flows.validation import check_inputs; "
        f"params = make_parameters('mace', options={{'model': {str(model_file)!r}}}); "
        "check_inputs(StructureSource(text=to_extxyz(bulk('Si', 'diamond', a=5.43))), params); "
        "print('torch' in sys.modules, 'mace' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


def test_atomforge_engines_lists_mace_with_its_options():
    atomforge = str(Path(sys.executable).with_name("atomforge"))
    out = subprocess.run(
        [atomforge, "engines", "mace"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("mace: MACE machine-learned potential from a model file")
    assert "-o model (str = ''): Path of a MACE model file" in out.stdout
    assert "-o dtype (model|float64|float32 = 'model')" in out.stdout
