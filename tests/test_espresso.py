"""Quantum ESPRESSO (pw.x) through the flows, and its parser replayed on real outputs.

Reference (../shared/README.md): Si diamond a=5.43 Å, LDA Si.pz-vbc.UPF, ecutwfc 20 Ry,
4x4x4 k-points: -215.426997 eV with pw.x 6.7 through ASE's Espresso calculator; its
vc-relax gives a = 5.3999 Å. The files under tests/data/espresso/ are pw.x 6.7 outputs of
inputs this engine wrote (each folder: the case's name says how it ends).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import time
from io import StringIO
from pathlib import Path

import numpy as np
import psutil
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.io import read

from atomforge.engines.errors import EngineError, InputError
from atomforge.engines.espresso import EspressoEngine
from atomforge.engines.structures import to_extxyz
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.settings import get_settings
from atomforge.flows.simulate import simulate
from atomforge.flows.validation import check_inputs
from tests.conftest import start_simulate_process

pytestmark = pytest.mark.skipif(shutil.which("pw.x") is None, reason="needs pw.x")

DATA = Path(__file__).parent / "data" / "espresso"
SI_ENERGY_EV = -215.426997
SI_RELAXED_A = 5.3999
PBE_O = "O=O.pbe-kjpaw.UPF"
SI_OPTIONS = {"ecutwfc": 20, "kpts": "4,4,4"}
CASES = {
    "si-scf": {"kind": "singlepoint", "options": SI_OPTIONS},
    "si-scf-unconverged": {
        "kind": "singlepoint",
        "options": SI_OPTIONS | {"electron_maxstep": 2},
    },
    "si-scf-must-not-converge": {
        "kind": "singlepoint",
        "options": SI_OPTIONS
        | {"electron_maxstep": 2, "input": {"electrons": {"scf_must_converge": False}}},
    },
    "si-vc-relax-out-of-steps": {
        "kind": "optimize",
        "relax_cell": True,
        "max_steps": 1,
        "options": SI_OPTIONS,
    },
    "si-scf-gap": {
        "kind": "singlepoint",
        "options": SI_OPTIONS | {"input": {"system": {"nbnd": 8}}},
    },
    "fe-spin-smearing": {
        "kind": "singlepoint",
        "options": {"ecutwfc": 25, "ecutrho": 200, "kpts": "4,4,4", "smearing": "mv"}
        | {"degauss": 0.02, "spin": True},
    },
}


def _si() -> Atoms:
    return bulk("Si", "diamond", a=5.43)


def _params(**fields):
    return make_parameters("espresso", **fields)


def _run(atoms: Atoms, **fields):
    """Return the result document of one espresso structure through the simulate flow."""
    return asyncio.run(simulate(StructureSource(text=to_extxyz(atoms)), _params(**fields)))


# Replayed outputs: the inputs the engine writes, and what it reads from pw.x's output.


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_writes_the_inputs_of_the_replayed_outputs(case, tmp_path):
    atoms = bulk("Fe", "bcc", a=2.83) if case.startswith("fe") else _si()
    EspressoEngine().write_inputs(atoms, _params(**CASES[case]), tmp_path)
    expected = (DATA / case / "espresso.pwi").read_text()
    assert (tmp_path / "espresso.pwi").read_text() == expected


def test_converged_scf_output_is_read():
    params = _params(**CASES["si-scf"])
    engine = EspressoEngine()
    assert engine.diagnose(DATA / "si-scf", params, None) is None
    out = engine.read_results(DATA / "si-scf", params)
    assert out.energy == pytest.approx(SI_ENERGY_EV, abs=1e-5)
    assert np.abs(out.forces).max() < 1e-6
    assert out.stress[:3] == pytest.approx([0.00969391] * 3, abs=1e-7)
    assert out.fermi_level == pytest.approx(6.1006)
    assert out.gap is None
    assert out.magmoms is None
    assert out.atoms.cell.cellpar()[0] == pytest.approx(5.43 / np.sqrt(2))
    assert out.properties["pseudopotentials"] == {"Si": "Si.pz-vbc.UPF"}


def test_fixed_occupations_with_empty_bands_give_the_gap():
    out = EspressoEngine().read_results(DATA / "si-scf-gap", _params(**CASES["si-scf-gap"]))
    assert out.gap == pytest.approx(6.7361 - 6.1026)
    assert out.fermi_level == pytest.approx(6.1026)


def test_spin_moments_are_read_from_the_magn_column():
    params = _params(**CASES["fe-spin-smearing"])
    assert (
        "starting_magnetization(1) = 0.229" in (DATA / "fe-spin-smearing/espresso.pwi").read_text()
    )
    out = EspressoEngine().read_results(DATA / "fe-spin-smearing", params)
    assert out.magmoms.tolist() == [1.9451]
    assert out.magmom == 1.94
    assert out.fermi_level == pytest.approx(13.6052)
    assert out.gap is None


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("si-scf-unconverged", "SCF not converged in 2 iterations"),
        ("si-scf-must-not-converge", "accuracy 2.44e-03 Ry > conv_thr 1e-06"),
    ],
)
def test_unconverged_scf_is_a_problem_never_a_number(case, message):
    params = _params(**CASES[case])
    engine = EspressoEngine()
    problem = engine.diagnose(DATA / case, params, None)
    assert problem.code == "scf_not_converged"
    assert message in problem.message
    with pytest.raises(ValueError, match="SCF not converged"):
        engine.read_results(DATA / case, params)


def test_only_the_last_run_of_an_appended_output_counts(tmp_path):
    runs = [(DATA / case / "espresso.pwo").read_text() for case in ("si-scf-unconverged", "si-scf")]
    (tmp_path / "espresso.pwo").write_text("".join(runs))
    params = _params(**CASES["si-scf"])
    assert EspressoEngine().diagnose(tmp_path, params, None) is None
    out = EspressoEngine().read_results(tmp_path, params)
    assert out.energy == pytest.approx(SI_ENERGY_EV, abs=1e-5)


def test_relax_out_of_steps_continues_from_its_last_geometry():
    params = _params(**CASES["si-vc-relax-out-of-steps"])
    engine = EspressoEngine()
    problem = engine.diagnose(DATA / "si-vc-relax-out-of-steps", params, None)
    assert problem.code == "optimization_not_converged"
    handler = next(h for h in engine.handlers if h.fixes == problem.code)
    correction = handler.correct(engine, DATA / "si-vc-relax-out-of-steps", params, problem)
    assert correction.atoms.get_volume() == pytest.approx(39.70963, abs=1e-4)


def test_options_read_strings_and_nest_namelists():
    params = _params(
        options={"kpts": "2, 3 4", "pseudopotentials": "Si=Si.pbe-rrkj.UPF", "input": {}}
        | {"input": {"SYSTEM": {"nbnd": 8}}, "smearing": "mv"}
    )
    assert params.options.kpts == (2, 3, 4)
    assert params.options.pseudopotentials == {"Si": "Si.pbe-rrkj.UPF"}
    data = EspressoEngine().input_data(params)
    assert data["system"] == {
        "ecutwfc": 30.0,
        "occupations": "smearing",
        "smearing": "mv",
        "degauss": 0.01,
        "nbnd": 8,
    }
    for grid in ("4,4", 4, "4,x,4", [4, 0, 4]):
        with pytest.raises(InputError, match="kpts needs three positive integers"):
            _params(options={"kpts": grid})
    with pytest.raises(InputError, match="pseudopotentials"):
        _params(options={"pseudopotentials": "Si"})


# Bad input: refused at validation, one line, before any engine starts.


def _validate(atoms: Atoms, **fields) -> None:
    check_inputs(StructureSource(text=to_extxyz(atoms)), _params(**fields))


@pytest.mark.parametrize(
    ("atoms", "fields", "message"),
    [
        (molecule("H2O"), {}, "espresso: needs a periodic cell"),
        (bulk("Xe", "fcc", a=6.2), {}, "no pseudopotential file for Xe in /usr/share/espresso"),
        (_si(), {"options": {"pseudopotentials": "Si=Si.none.UPF"}}, "set pseudopotentials="),
        (bulk("GaN", "zincblende", a=4.5), {}, "no pseudopotential file for Ga"),
        (bulk("NiO", "rocksalt", a=4.2), {"options": {"pseudopotentials": PBE_O}}, "mix"),
    ],
)
def test_bad_input_is_refused_in_one_line(atoms, fields, message):
    with pytest.raises(InputError) as info:
        _validate(atoms, **fields)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_pw_x_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("ATOMFORGE_ESPRESSO_COMMAND", "/nonexistent/pw.x")
    with pytest.raises(InputError, match="ATOMFORGE_ESPRESSO_COMMAND"):
        _validate(_si())


# Real pw.x through the simulate flow.


def test_silicon_singlepoint_matches_the_reference():
    result = _run(_si(), kind="singlepoint", options=SI_OPTIONS)
    assert result.status == "completed"
    assert result.engine_version == "6.7MaX"
    assert result.energy_eV == pytest.approx(SI_ENERGY_EV, abs=1e-4)
    assert result.max_force_eV_per_A < 1e-4
    assert result.fermi_level_eV == pytest.approx(6.1006, abs=1e-3)
    assert result.corrections == []


def test_silicon_vc_relax_matches_the_reference_lattice_constant():
    result = _run(_si(), kind="optimize", relax_cell=True, options=SI_OPTIONS)
    assert result.converged is True
    assert result.n_steps >= 1
    final = read(StringIO(result.final_structure), format="extxyz")
    assert final.cell.cellpar()[0] * np.sqrt(2) == pytest.approx(SI_RELAXED_A, abs=5e-3)
    assert abs(result.pressure_GPa) < 0.1


def test_two_mpi_ranks_give_the_same_energy():
    result = _run(_si(), kind="singlepoint", cores=2, options=SI_OPTIONS)
    assert re.search(r"Parallel version \(MPI\), running on\s+2 processors", _output(result))
    assert result.energy_eV == pytest.approx(SI_ENERGY_EV, abs=1e-4)


def _output(result) -> str:
    return (Path(result.workdir) / "espresso.pwo").read_text()


def test_unconverged_scf_is_corrected_with_smaller_mixing():
    result = _run(_si(), kind="singlepoint", options=SI_OPTIONS | {"electron_maxstep": 2})
    assert result.status == "completed"
    assert result.energy_eV == pytest.approx(SI_ENERGY_EV, abs=1e-4)
    first = result.corrections[0]
    assert first["problem"] == "scf_not_converged"
    assert first["options"] == {"mixing_beta": 0.35, "electron_maxstep": 4}
    assert _output(result).count("Program PWSCF") == len(result.corrections) + 1


def test_without_corrections_an_unconverged_scf_fails_with_its_reason(monkeypatch):
    monkeypatch.setenv("ATOMFORGE_MAX_CORRECTIONS", "0")
    with pytest.raises(EngineError, match="SCF not converged in 2 iterations"):
        _run(_si(), kind="singlepoint", options=SI_OPTIONS | {"electron_maxstep": 2})


# Cancellation: the flow is stopped the way test_cancellation.py stops it (SIGTERM).


def _engine_ranks(control_root: Path, timeout: float = 90) -> list[psutil.Process]:
    """Return the recorded engine process and its tree, once two pw.x ranks run in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in control_root.glob("*/pids/*.json"):
            tree = _tree(record)
            if sum(p.name() == "pw.x" for p in tree) == 2:
                return tree
        time.sleep(0.2)
    raise AssertionError("pw.x ranks did not start")


def _tree(record: Path) -> list[psutil.Process]:
    """Return the process a pid record names and its descendants (none if it is gone)."""
    try:
        root = psutil.Process(json.loads(record.read_text())["pid"])
        return [root, *root.children(recursive=True)]
    except (psutil.Error, ValueError, KeyError, OSError):
        return []


def test_stopping_a_run_leaves_no_pw_x_or_mpirun(tmp_path):
    structure = tmp_path / "si8.extxyz"
    structure.write_text(to_extxyz(bulk("Si", "diamond", a=5.43, cubic=True)))
    options = {"ecutwfc": 60, "kpts": "8,8,8", "conv_thr": 1e-12, "electron_maxstep": 500}
    flow = start_simulate_process(
        tmp_path, structure, engine="espresso", kind="singlepoint", cores=2, options=options
    )
    try:
        tree = _engine_ranks(get_settings().resolved_work_root() / ".control")
        assert {p.name() for p in tree} >= {"mpirun", "pw.x"}
        flow.send_signal(signal.SIGTERM)
        flow.wait(timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.1)
        assert [p.pid for p in tree if _alive(p)] == []
    finally:
        if flow.poll() is None:
            flow.kill()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
