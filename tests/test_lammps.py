"""The lammps engine: real lmp through the simulate flow, and its parsers on real outputs.

References: ../shared/README.md (LAMMPS eam Cu_u3.eam: a0 = 3.6150 A, Ec = -3.5400 eV/atom,
7-point EOS through ASE); ASE's own EAM calculator on the same potential file for energy,
forces and stress. ASE converts the funcfl pair charges with Hartree * Bohr = 14.3996 eV A,
LAMMPS with 27.2 * 0.529 = 14.3888 eV A (pair_eam.cpp), so the reference pair function is
scaled by their ratio; then the two agree to 6e-7 eV and 9e-5 eV/A (measured here).
The files under tests/data/lammps/ were written by this engine and run with lmp 29 Sep 2021
by hand (``lmp -in in.lmp -log log.lammps -nocite``): a 1-atom fcc cell relaxed from a = 3.6,
4 atoms of NVT MD for 20 steps, a minimization out of iterations, a missing potential.
"""

from __future__ import annotations

import asyncio
import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.eam import EAM
from ase.io import read
from ase.units import Bohr, Hartree

from atomforge.engines import get_engine
from atomforge.engines import lammps_output as log
from atomforge.engines.errors import InputError
from atomforge.engines.lammps_input import LammpsOptions, pair_lines, potential_elements
from atomforge.engines.status import JobStatus, Status
from atomforge.engines.structures import to_extxyz
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.simulate import simulate
from atomforge.flows.validation import check_inputs

DATA = Path(__file__).parent / "data" / "lammps"
POTENTIALS = Path("/usr/share/lammps/potentials")
CU_A0, CU_EC = 3.6150, -3.5400
CU = {"potential": "Cu_u3.eam"}

pytestmark = pytest.mark.skipif(shutil.which("lmp") is None, reason="lmp is not installed")


def _run(atoms, monkeypatch=None, max_corrections: int = 3, **params):
    """Return the final state of simulate on ``atoms`` with lammps and ``params``."""
    if monkeypatch is not None:
        monkeypatch.setenv("ATOMFORGE_MAX_CORRECTIONS", str(max_corrections))
    source = StructureSource(text=to_extxyz(atoms))
    parameters = make_parameters("lammps", **params)
    return asyncio.run(simulate(source, parameters, return_state=True))


def _document(state):
    """Return the result document of a finished simulate run."""
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import query_results

    root = get_settings().resolved_results_root()
    (result,) = query_results(root, flow_run_id=str(state.state_details.flow_run_id))
    return result


def _skewed_copper() -> object:
    """Return 27 rattled Cu atoms in a rotated, triclinic (primitive fcc) cell."""
    atoms = bulk("Cu", "fcc", a=3.63).repeat(3)
    atoms.rotate(30, "x", rotate_cell=True)
    atoms.rotate(20, "z", rotate_cell=True)
    atoms.rattle(0.05, seed=3)
    return atoms


def _ase_eam(atoms):
    """Return ``atoms`` with ASE's EAM on Cu_u3.eam, pair term converted as LAMMPS does."""
    calc = EAM(potential=str(POTENTIALS / "Cu_u3.eam"))
    calc.rphi_data *= 27.2 * 0.529 / (Hartree * Bohr)
    calc.set_splines()
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms


@pytest.fixture(scope="module")
def singlepoints():
    """Return the documents of one skewed-cell single point on 1 and on 2 MPI ranks."""
    atoms = _skewed_copper()
    return {
        cores: _document(_run(atoms, kind="singlepoint", cores=cores, options=CU))
        for cores in (1, 2)
    }


def test_relaxed_copper_cell_matches_the_reference():
    state = _run(bulk("Cu", "fcc", a=3.6), kind="optimize", relax_cell=True, fmax=1e-3, options=CU)
    result = _document(state)
    assert result.status == "completed"
    assert result.converged is True
    assert result.engine_version.startswith("29 Sep 2021")
    final = read(StringIO(result.final_structure), format="extxyz")
    assert final.cell.cellpar()[0] * np.sqrt(2) == pytest.approx(CU_A0, abs=0.002)
    assert result.energy_per_atom_eV == pytest.approx(CU_EC, abs=0.001)
    assert np.allclose(
        final.cell.array, bulk("Cu", "fcc", a=3.6).cell.array * final.cell[0, 1] / 1.8
    )
    assert abs(result.pressure_GPa) < 0.01


def test_singlepoint_matches_ase_eam_on_a_rotated_triclinic_cell(singlepoints):
    result = singlepoints[1]
    reference = _ase_eam(_skewed_copper())
    assert result.energy_eV == pytest.approx(reference.get_potential_energy(), abs=1e-4)
    forces = np.array(result.forces_eV_per_A)
    assert np.abs(forces - reference.get_forces()).max() < 3e-4
    assert np.abs(np.array(result.stress_eV_per_A3) - reference.get_stress()).max() < 1e-5
    final = read(StringIO(result.final_structure), format="extxyz")
    assert np.allclose(final.cell.array, reference.cell.array)
    distances = final.get_distances(0, range(len(final)), mic=True)
    assert np.allclose(distances, reference.get_distances(0, range(len(final)), mic=True))


def test_two_mpi_ranks_give_the_energy_of_one(singlepoints):
    assert singlepoints[2].energy_eV == pytest.approx(singlepoints[1].energy_eV, abs=1e-8)
    assert "on 2 procs" in Path(singlepoints[2].workdir, "lammps.out").read_text()
    one, two = (np.array(singlepoints[c].forces_eV_per_A) for c in (1, 2))
    assert np.abs(one - two).max() < 1e-8


def test_mpi_command_line_uses_mpirun_for_two_cores():
    command = get_engine("lammps").command(
        make_parameters("lammps", cores=2, options=CU), [Path("job")]
    )
    assert command.argv[1:3] == ["-np", "2"]
    assert command.argv[3:] == ["lmp", "-in", "in.lmp", "-log", "log.lammps", "-nocite"]
    assert command.env["OMP_NUM_THREADS"] == "1"


def test_nvt_md_writes_thermo_table_and_trajectory():
    atoms = bulk("Cu", "fcc", a=CU_A0, cubic=True).repeat(2)
    options = {**CU, "ensemble": "nvt", "temperature": 300, "steps": 200, "thermo_every": 10}
    result = _document(_run(atoms, kind="md", options=options))
    assert result.status == "completed"
    assert result.n_steps == 200
    thermo = result.properties["thermo"]
    assert set(thermo) == {
        "step",
        "time_ps",
        "temperature_K",
        "potential_energy_eV",
        "kinetic_energy_eV",
        "total_energy_eV",
        "pressure_bar",
        "volume_A3",
    }
    assert thermo["step"] == [float(s) for s in range(0, 201, 10)]
    assert thermo["time_ps"][-1] == pytest.approx(0.2)
    assert thermo["temperature_K"][0] == pytest.approx(300, abs=1e-6)
    assert 150 < np.mean(thermo["temperature_K"][10:]) < 450
    frames = read(Path(result.workdir) / "trajectory.extxyz", index=":")
    assert len(frames) == 21
    assert all(len(frame) == 32 for frame in frames)
    energies = [frame.get_potential_energy() for frame in frames]
    assert energies == pytest.approx(thermo["potential_energy_eV"])
    assert result.energy_eV == pytest.approx(thermo["potential_energy_eV"][-1])


def test_npt_md_keeps_a_triclinic_cell_shape_and_changes_its_volume():
    atoms = bulk("Cu", "fcc", a=3.55).repeat(3)
    options = {**CU, "ensemble": "npt", "temperature": 300, "pressure": 0.0, "steps": 100}
    result = _document(_run(atoms, kind="md", options=options))
    final = read(StringIO(result.final_structure), format="extxyz")
    assert final.cell.cellpar()[3:] == pytest.approx([60, 60, 60], abs=1e-8)
    assert final.cell.volume > atoms.cell.volume * 1.01


def test_optimization_out_of_iterations_continues_from_its_last_geometry(monkeypatch):
    atoms = bulk("Cu", "fcc", a=CU_A0, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=3)
    state = _run(atoms, monkeypatch, 3, kind="optimize", max_steps=2, options=CU)
    assert state.is_completed()
    result = _document(state)
    assert result.corrections[0]["problem"] == "optimization_not_converged"
    assert result.corrections[0]["action"] == "continue from the last geometry"
    assert result.converged is True
    assert result.max_force_eV_per_A < 0.01


def test_optimization_out_of_iterations_fails_with_the_reason_without_corrections(monkeypatch):
    atoms = bulk("Cu", "fcc", a=CU_A0, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=3)
    state = _run(atoms, monkeypatch, 0, kind="optimize", max_steps=2, options=CU)
    assert state.is_failed()
    result = _document(state)
    assert result.message == "lammps: minimization not converged in 2 iterations"
    assert result.corrections == []


def _refusal(atoms, **params) -> str:
    """Return the one-line InputError check_inputs raises for ``atoms`` and ``params``."""
    with pytest.raises(InputError) as info:
        check_inputs(StructureSource(text=to_extxyz(atoms)), make_parameters("lammps", **params))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_element_missing_from_the_potential_is_refused():
    message = _refusal(bulk("Fe", "bcc", a=2.87), options=CU)
    assert "element Fe is not in potential Cu_u3.eam (has: Cu)" in message


def test_unknown_potential_file_is_refused():
    message = _refusal(bulk("Cu"), options={"potential": "Nope.eam"})
    assert "no potential file /usr/share/lammps/potentials/Nope.eam" in message


def test_missing_lmp_is_refused(monkeypatch):
    monkeypatch.setenv("ATOMFORGE_LAMMPS_COMMAND", "/nonexistent")
    assert "ATOMFORGE_LAMMPS_COMMAND" in _refusal(bulk("Cu"), options=CU)


def test_missing_potential_folder_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOMFORGE_LAMMPS_POTENTIAL_DIR", str(tmp_path / "none"))
    assert "ATOMFORGE_LAMMPS_POTENTIAL_DIR" in _refusal(bulk("Cu"), options=CU)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kind": "md", "options": {**CU, "ensemble": "npt", "temperature": 300}}, "pressure"),
        ({"kind": "md", "options": CU}, "ensemble nvt needs a temperature"),
        (
            {"relax_cell": True, "options": {**CU, "min_style": "fire"}},
            "fire cannot relax the cell",
        ),
        ({"options": {"pair_style": "lj/cut 8.0"}}, "pair_style needs pair_coeff"),
        ({"options": {}}, "give either options.potential or options.pair_style"),
    ],
)
def test_inconsistent_options_are_refused(params, message):
    assert message in _refusal(bulk("Cu"), **params)


def test_molecule_is_refused():
    from ase import Atoms

    assert "periodic" in _refusal(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3]]), options=CU)


@pytest.mark.parametrize(
    ("name", "elements"),
    [
        ("Cu_u3.eam", {"Cu"}),
        ("CuNi.eam.alloy", {"Cu", "Ni"}),
        ("Fe_mm.eam.fs", {"Fe"}),
        ("Si.sw", {"Si"}),
        ("SiC.tersoff", {"Si", "C"}),
    ],
)
def test_potential_elements_are_read_from_the_file(name, elements):
    assert potential_elements(POTENTIALS / name) == elements


def test_pair_lines_for_eam_alloy_name_each_type():
    path = POTENTIALS / "CuNi.eam.alloy"
    lines = pair_lines(LammpsOptions(potential=path.name), path, ["Cu", "Ni"])
    assert lines == ["pair_style eam/alloy", f"pair_coeff * * {path} Cu Ni"]


def test_thermo_tables_are_read_from_a_real_md_log():
    (table,) = log.read_thermo((DATA / "md-log.lammps").read_text())
    assert table["Step"] == [0.0, 10.0, 20.0]
    assert table["Temp"][0] == pytest.approx(300.0)
    assert table["PotEng"][0] == pytest.approx(4 * CU_EC, abs=1e-6)
    assert log.lammps_version((DATA / "md-log.lammps").read_text()) == "29 Sep 2021 - Update 2"


def test_minimization_stats_are_read_from_real_logs():
    relax = (DATA / "relax-log.lammps").read_text()
    assert log.stopping_criterion(relax) == "force tolerance"
    assert log.minimize_iterations(relax) == log.read_thermo(relax)[-1]["Step"][-1] == 42
    maxiter = (DATA / "maxiter-log.lammps").read_text()
    assert log.stopping_criterion(maxiter) == "max iterations"
    assert log.minimize_iterations(maxiter) == 2


def test_error_lines_are_found_in_real_screen_output():
    (line,) = log.error_lines((DATA / "error-lammps.out").read_text())
    assert line.startswith("ERROR on proc 0: cannot open eam potential file Cu_missing.eam")
    assert log.error_lines((DATA / "md-log.lammps").read_text()) == []


def _job(tmp_path: Path, prefix: str) -> Path:
    """Return a job directory holding the stored outputs named ``prefix``-*, renamed back."""
    for path in DATA.glob(f"{prefix}-*"):
        shutil.copy(path, tmp_path / path.name.removeprefix(f"{prefix}-"))
    return tmp_path


def test_relaxed_cell_is_read_back_in_the_input_orientation(tmp_path):
    params = make_parameters("lammps", relax_cell=True, options=CU)
    results = get_engine("lammps").read_results(_job(tmp_path, "relax"), params)
    start = bulk("Cu", "fcc", a=3.6).cell.array
    scale = results.atoms.cell[0, 1] / start[0, 1]
    assert np.allclose(results.atoms.cell.array, start * scale, atol=1e-10)
    assert scale * 3.6 == pytest.approx(CU_A0, abs=1e-3)
    assert results.converged is True
    assert results.energy == pytest.approx(CU_EC, abs=1e-4)
    assert np.abs(results.stress).max() < 1e-5


def test_md_outputs_are_read_into_thermo_and_trajectory(tmp_path):
    options = {**CU, "temperature": 300, "steps": 20, "thermo_every": 10}
    params = make_parameters("lammps", kind="md", options=options)
    results = get_engine("lammps").read_results(_job(tmp_path, "md"), params)
    assert results.n_steps == 20
    assert results.properties["thermo"]["step"] == [0.0, 10.0, 20.0]
    frames = read(tmp_path / "trajectory.extxyz", index=":")
    assert len(frames) == 3
    # LAMMPS' ke is dof/2 kB T with metal units' own constants: 6e-5 off sum(m v^2)/2
    kinetic = results.properties["thermo"]["kinetic_energy_eV"]
    assert [f.get_kinetic_energy() for f in frames] == pytest.approx(kinetic, rel=1e-4)


def test_diagnose_names_the_lammps_error_and_the_unfinished_minimization(tmp_path):
    engine = get_engine("lammps")
    params = make_parameters("lammps", max_steps=2, options=CU)
    job = _job(tmp_path, "maxiter")
    shutil.copy(DATA / "relax-final.dump", job / "final.dump")
    (job / "lammps.out").write_text("")
    problem = engine.diagnose(job, params, JobStatus(Status.completed))
    assert problem.code == "optimization_not_converged"
    shutil.copy(DATA / "error-lammps.out", job / "lammps.out")
    problem = engine.diagnose(job, params, JobStatus(Status.failed))
    assert problem.code == "lammps_error"
    assert "cannot open eam potential file Cu_missing.eam" in problem.message
