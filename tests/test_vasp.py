"""The VASP engine without VASP: real VASP output files that ship with ASE, stand-in programs.

References (../shared/README.md, read from the files by ASE): vasprun_pstress.xml (VASP 6.3.0,
C2) -20.247201 eV; vasprun_dfpt.xml (VASP 6.3.2, NaCl) -6.745873 eV; OUTCAR_example_1
(VASP 5.3.3, Ni18 cluster with forces up to 2.15 eV/Å) -68.231024 eV. convergence_OUTCAR_y_n
and _y_y are VASP 6 OUTCAR excerpts whose SCF ends "EDIFF was not reached (unconverged)"
and "because EDIFF is reached". What a stand-in cannot provoke: VASP itself reaching NELM
or NSW, or choosing how to react to a changed ALGO; the stand-ins replay real outputs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
from pathlib import Path

import ase
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import read

from atomforge.engines import InputError, get_engine, make_parameters
from atomforge.engines.base import ContinueOptimization
from atomforge.engines.status import JobStatus, Status
from atomforge.engines.structures import to_extxyz
from atomforge.engines.vasp import StrongerScf
from atomforge.flows.models import StructureSource
from atomforge.flows.simulate import simulate
from atomforge.flows.validation import check_inputs
from tests.conftest import REPO

VASP_DATA = Path(ase.__file__).parent / "test" / "testdata" / "vasp"
FAKE_POTCAR = VASP_DATA / "fake_pseudos" / "potpaw_PBE" / "Na" / "POTCAR"
ATOMFORGE = str(REPO / ".venv" / "bin" / "atomforge")
pytestmark = pytest.mark.skipif(
    not VASP_DATA.is_dir(), reason=f"ASE's VASP test data is not installed ({VASP_DATA})"
)


@pytest.fixture
def pp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Return a POTCAR folder laid out as ASE expects (potpaw_PBE/X/POTCAR), set as VASP_PP_PATH."""
    root = tmp_path / "potcars"
    for symbol in ("Si", "C", "Ni", "Na", "Cl"):
        (root / "potpaw_PBE" / symbol).mkdir(parents=True)
        shutil.copy(FAKE_POTCAR, root / "potpaw_PBE" / symbol / "POTCAR")
    monkeypatch.delenv("ATOMFORGE_VASP_PP_PATH", raising=False)
    monkeypatch.setenv("VASP_PP_PATH", str(root))
    return root


def _stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """Write a stand-in VASP that checks its inputs, then runs ``body``; make it the command."""
    script = tmp_path / "fake_vasp"
    script.write_text(
        "#!/bin/sh\n"
        "for f in INCAR POSCAR POTCAR; do\n"
        '  [ -s "$f" ] || { echo "error: no $f" >&2; exit 1; }\n'
        "done\n" + body
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("ATOMFORGE_VASP_COMMAND", str(script))
    return script


def _input_structure(name: str) -> Atoms:
    """Return the structure of a real VASP output, without its results."""
    frame = read(VASP_DATA / name, format="vasp-xml" if name.endswith(".xml") else "vasp-out")
    return Atoms(frame.symbols, frame.positions, cell=frame.cell, pbc=True)


def _replay(tmp_path: Path, files: dict[str, str], kind: str = "singlepoint", **fields):
    """Return the engine, parameters and job directory after writing inputs and copying outputs."""
    engine = get_engine("vasp")
    params = make_parameters("vasp", kind=kind, **fields)
    first = next(name for name in files.values() if "vasprun" in name or "example" in name)
    job = tmp_path / "job"
    job.mkdir()
    engine.write_inputs(_input_structure(first), params, job)
    for target, name in files.items():
        shutil.copy(VASP_DATA / name, job / target)
    return engine, params, job


@pytest.mark.parametrize(
    ("files", "energy", "formula", "version"),
    [
        ({"vasprun.xml": "vasprun_pstress.xml"}, -20.247201, "C2", "6.3.0"),
        ({"vasprun.xml": "vasprun_dfpt.xml"}, -6.745873, "ClNa", "6.3.2"),
        ({"OUTCAR": "OUTCAR_example_1"}, -68.231024, "Ni18", "unknown"),
    ],
)
def test_reads_real_vasp_output(tmp_path, pp_path, files, energy, formula, version):
    engine, params, job = _replay(tmp_path, files)
    out = engine.read_results(job, params)
    assert out.energy == pytest.approx(energy, abs=1e-6)
    assert out.atoms.get_chemical_formula() == formula
    assert out.forces.shape == (len(out.atoms), 3)
    assert out.stress.shape == (6,)
    assert out.fermi_level is not None
    assert out.n_steps == 1
    assert (out.version or "unknown") == version


def test_outcar_gives_the_magnetic_moment(tmp_path, pp_path):
    engine, params, job = _replay(tmp_path, {"OUTCAR": "OUTCAR_example_1"})
    assert engine.read_results(job, params).magmom is not None


@pytest.mark.parametrize(
    ("fields", "tags"),
    [
        ({"kind": "singlepoint"}, {"NSW": "0", "IBRION": "-1"}),
        (
            {"kind": "optimize", "max_steps": 40, "fmax": 0.02},
            {"NSW": "40", "IBRION": "2", "ISIF": "2", "EDIFFG": "-2.00e-02"},
        ),
        ({"kind": "optimize", "relax_cell": True}, {"ISIF": "3", "NSW": "500"}),
    ],
)
def test_writes_vasp_inputs_for_si(tmp_path, pp_path, fields, tags):
    options = {"encut": 300, "kpts": "4,4,4", "incar": {"ALGO": "Fast"}}
    params = make_parameters("vasp", options=options, **fields)
    get_engine("vasp").write_inputs(bulk("Si", "diamond", a=5.43), params, tmp_path)
    incar = dict(
        (part.strip() for part in line.split("="))
        for line in (tmp_path / "INCAR").read_text().splitlines()
    )
    assert incar | tags == incar
    assert float(incar["ENCUT"]) == 300 and incar["ALGO"] == "Fast"
    assert (tmp_path / "KPOINTS").read_text().splitlines()[3].split() == ["4", "4", "4"]
    assert read(tmp_path / "POSCAR", format="vasp").get_chemical_formula() == "Si2"
    assert (tmp_path / "POTCAR").read_text() == FAKE_POTCAR.read_text()


def test_without_a_k_grid_vasp_gets_its_default_kspacing(tmp_path, pp_path):
    get_engine("vasp").write_inputs(bulk("Si"), make_parameters("vasp"), tmp_path)
    assert "KSPACING = 0.500000" in (tmp_path / "INCAR").read_text()
    assert not (tmp_path / "KPOINTS").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kpts": "4,4"}, "kpts needs three numbers"),
        ({"kpts": [2, 2, 2], "kspacing": 0.3}, "not both"),
        ({"xc": "nonsense"}, "unknown xc"),
        ({"setups": "nonsense"}, "unknown setups"),
        ({"incar": {"foo": {"a": 1}}}, "cannot handle type"),
    ],
)
def test_bad_options_are_one_line_input_errors(options, message):
    with pytest.raises(InputError, match=message):
        make_parameters("vasp", options=options)


def _si_source() -> StructureSource:
    return StructureSource(text=to_extxyz(bulk("Si", "diamond", a=5.43)))


def test_missing_program_or_potcars_fail_check_inputs(tmp_path, pp_path, monkeypatch):
    monkeypatch.setenv("ATOMFORGE_VASP_COMMAND", str(tmp_path / "no-such-vasp"))
    with pytest.raises(InputError, match="ATOMFORGE_VASP_COMMAND") as missing_program:
        check_inputs(_si_source(), make_parameters("vasp"))
    _stand_in(tmp_path, monkeypatch, "exit 0\n")
    monkeypatch.delenv("VASP_PP_PATH")
    with pytest.raises(InputError, match="VASP_PP_PATH") as missing_potcars:
        check_inputs(_si_source(), make_parameters("vasp"))
    monkeypatch.setenv("VASP_PP_PATH", str(pp_path))
    gold = StructureSource(text=to_extxyz(bulk("Au")))
    with pytest.raises(InputError, match="POTCAR not found") as missing_element:
        check_inputs(gold, make_parameters("vasp"))
    for error in (missing_program, missing_potcars, missing_element):
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ATOMFORGE_VASP_COMMAND": "/no/such/vasp_std"}, "ATOMFORGE_VASP_COMMAND"),
        ({"ATOMFORGE_VASP_COMMAND": "true", "VASP_PP_PATH": "/no/such/dir"}, "VASP_PP_PATH"),
    ],
)
def test_cli_exits_2_with_one_line_when_vasp_is_missing(tmp_path, env, message):
    structure = tmp_path / "si.extxyz"
    structure.write_text(to_extxyz(bulk("Si")))
    base = {k: v for k, v in os.environ.items() if "VASP" not in k}
    out = subprocess.run(
        [ATOMFORGE, "run", str(structure), "--engine", "vasp"],
        env=base | env | {"ATOMFORGE_HOME": str(tmp_path / "home")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("atomforge: error:"), out.stderr
    assert message in lines[0]


def test_flow_with_stand_in_vasp_reports_the_file_energy(tmp_path, pp_path, monkeypatch):
    _stand_in(
        tmp_path,
        monkeypatch,
        f'grep -q "NSW = 0" INCAR || exit 3\ncp {VASP_DATA}/vasprun_pstress.xml vasprun.xml\n',
    )
    source = StructureSource(text=to_extxyz(_input_structure("vasprun_pstress.xml")))
    result = asyncio.run(simulate(source, make_parameters("vasp", kind="singlepoint")))
    assert result.energy_eV == pytest.approx(-20.247201, abs=1e-6)
    assert result.formula == "C2" and result.corrections == []
    assert result.engine_version == "6.3.0"
    assert np.array(result.forces_eV_per_A).shape == (2, 3)
    assert (Path(result.workdir) / "vasp.out").exists()


def test_unconverged_scf_is_rerun_with_algo_all(tmp_path, pp_path, monkeypatch):
    _stand_in(
        tmp_path,
        monkeypatch,
        f"cp {VASP_DATA}/vasprun_pstress.xml vasprun.xml\n"
        f'if grep -q "ALGO = All" INCAR; then cp {VASP_DATA}/convergence_OUTCAR_y_y OUTCAR\n'
        f"else cp {VASP_DATA}/convergence_OUTCAR_y_n OUTCAR; fi\n",
    )
    source = StructureSource(text=to_extxyz(_input_structure("vasprun_pstress.xml")))
    result = asyncio.run(simulate(source, make_parameters("vasp", kind="singlepoint")))
    assert [c["problem"] for c in result.corrections] == ["scf_not_converged"]
    assert result.corrections[0]["options"] == {"incar": {"algo": "All"}}
    assert result.energy_eV == pytest.approx(-20.247201, abs=1e-6)


def test_scf_handler_steps_algo_then_nelm_then_gives_up():
    def corrected(incar):
        params = make_parameters("vasp", options={"incar": incar})
        return StrongerScf().correct(None, Path(), params, None)

    assert corrected({"ALGO": "Fast"}).options == {"incar": {"algo": "Normal"}}
    assert corrected({}).options == {"incar": {"algo": "All"}}
    assert corrected({"algo": "All"}).options == {"incar": {"algo": "All", "nelm": 120}}
    assert corrected({"algo": "All", "nelm": 480}) is None


def test_relaxation_out_of_steps_continues_from_its_last_geometry(tmp_path, pp_path):
    files = {"OUTCAR": "OUTCAR_example_1"}
    engine, params, job = _replay(tmp_path, files, kind="optimize", max_steps=1)
    problem = engine.diagnose(job, params, JobStatus(Status.completed))
    assert problem.code == "optimization_not_converged"
    assert engine.read_results(job, params).converged is False
    correction = ContinueOptimization().correct(engine, job, params, problem)
    expected = read(VASP_DATA / "OUTCAR_example_1", format="vasp-out")
    assert np.allclose(correction.atoms.positions, expected.positions)
    roomy = make_parameters("vasp", kind="optimize", max_steps=50)
    assert engine.diagnose(job, roomy, JobStatus(Status.completed)) is None
