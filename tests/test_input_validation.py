"""Bad input is refused with a clear one-line InputError before any engine starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from atomforge.engines.errors import InputError
from atomforge.flows.models import RunOptions, StructureSource, make_parameters
from atomforge.flows.paths import run_paths
from atomforge.flows.settings import Settings
from atomforge.flows.validation import check_inputs


def _check(tmp_path: Path, text: str, suffix: str = ".xyz", **params) -> None:
    path = tmp_path / f"input{suffix}"
    path.write_text(text)
    check_inputs(StructureSource(path=str(path)), make_parameters(**params))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "structure file is empty"),
        ("\n  \n", "structure file is empty"),
        ("garbage\n", "cannot read structure"),
        ("3\n\nO 0 0\n", "cannot read structure"),
        ("3\n\nO 0 0 0\nH 0 0 1\n", "cannot read structure"),
        ("2\n\nXx 0 0 0\nH 0 0 1\n", "unknown element 'Xx'"),
        ("2\n\nH 0 0 0\nH 0 0 0.1\n", "overlap, 0.100 A apart"),
        ("1\n\nH nan 0 0\n", "NaN"),
    ],
)
def test_bad_structure_files_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(InputError) as info:
        _check(tmp_path, text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_overlap_across_a_periodic_boundary_is_found():
    from ase.build import bulk

    from atomforge.engines.structures import check_geometry

    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    cell.positions[1] = cell.positions[0] - [0.1, 0.0, 0.0]
    cell.wrap()
    with pytest.raises(InputError, match=r"atoms 0 \(Cu\) and 1 \(Cu\) overlap, 0.100 A"):
        check_geometry(cell, "cu")


def test_overlap_in_a_large_molecule_is_found():
    import numpy as np
    from ase import Atoms

    from atomforge.engines.structures import DIRECT_DISTANCES_MAX_ATOMS, check_geometry

    n = DIRECT_DISTANCES_MAX_ATOMS + 10
    grid = np.array([(x, y, z) for x in range(10) for y in range(10) for z in range(6)])[:n]
    atoms = Atoms(f"C{n}", positions=2.0 * grid)
    check_geometry(atoms, "grid")
    atoms.positions[-1] = atoms.positions[3] + [0.0, 0.2, 0.0]
    with pytest.raises(InputError, match=f"atoms 3 \\(C\\) and {n - 1} \\(C\\) overlap, 0.200 A"):
        check_geometry(atoms, "grid")


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such structure file"):
        check_inputs(StructureSource(path=str(tmp_path / "nope.xyz")), make_parameters())


@pytest.mark.parametrize(
    ("charge", "multiplicity", "message"),
    [
        (0, 2, "multiplicity 2 is impossible with 10 electrons"),
        (1, 1, "multiplicity 1 is impossible with 9 electrons"),
        (0, 13, "multiplicity 13 is impossible"),
        (11, 1, "leaves -1 electrons"),
    ],
)
def test_impossible_charge_or_multiplicity_is_refused(tmp_path, charge, multiplicity, message):
    from tests.conftest import WATER_XYZ

    with pytest.raises(InputError, match=message):
        _check(tmp_path, WATER_XYZ, charge=charge, multiplicity=multiplicity)


def test_possible_radical_is_accepted(tmp_path):
    from tests.conftest import WATER_XYZ

    _check(tmp_path, WATER_XYZ, charge=1, multiplicity=2)


def test_unknown_engine_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"^unknown engine 'gaussian'"):
        make_parameters(engine="gaussian")
    from atomforge.engines import get_engine

    with pytest.raises(InputError, match=r"unknown engine .gaussian. \(available: .*emt, .*tblite"):
        get_engine("gaussian")


def test_wrong_parameter_types_are_refused():
    with pytest.raises(InputError, match=r"^charge: Input should be a valid integer"):
        make_parameters(charge="one")
    with pytest.raises(InputError, match=r"^multiplicity: "):
        make_parameters(multiplicity=0)
    with pytest.raises(InputError, match=r"^timeout_seconds: "):
        make_parameters(timeout_seconds=-1)
    with pytest.raises(InputError, match=r"^unknown_field: Extra inputs"):
        make_parameters(unknown_field=1)
    with pytest.raises(InputError, match=r"^options.method: Input should be 'GFN2-xTB'"):
        make_parameters(options={"method": "GFN9"})
    with pytest.raises(InputError, match=r"^options.nosuch: Extra inputs"):
        make_parameters(engine="tblite", options={"nosuch": 1})


def test_each_engine_has_its_own_parameters_model():
    from atomforge.engines.registry import parameters_model

    with pytest.raises(ValidationError):
        parameters_model("xtb")(charge="one")
    assert parameters_model("tblite")().options.method == "GFN2-xTB"


def test_engines_refuse_what_they_cannot_compute(tmp_path):
    from tests.conftest import WATER_XYZ

    with pytest.raises(InputError, match="emt: no parameters for"):
        _check(tmp_path, "1\n\nFe 0 0 0\n", engine="emt", kind="singlepoint")
    with pytest.raises(InputError, match=r"emt.*no charge or spin"):
        _check(tmp_path, WATER_XYZ, engine="emt", charge=1, multiplicity=2)
    with pytest.raises(InputError, match=r"xtb.*cannot compute periodic"):
        _check(
            tmp_path,
            '2\nLattice="3 0 0 0 3 0 0 0 3" Properties=species:S:1:pos:R:3 pbc="T T T"\n'
            "Cu 0 0 0\nCu 1.5 1.5 0\n",
            suffix=".extxyz",
        )
    with pytest.raises(InputError, match=r"options.basis: Extra inputs are not permitted"):
        _check(tmp_path, WATER_XYZ, options={"basis": "def2-SVP"})
    with pytest.raises(InputError, match=r"options.method: Input should be"):
        _check(tmp_path, WATER_XYZ, options={"method": "GFN9-xTB"})


@pytest.mark.parametrize("run_dir", ["../elsewhere", "/etc", "a/../../b", ".."])
def test_run_dir_cannot_escape_the_work_root(tmp_path, run_dir):
    with pytest.raises(ValidationError):
        RunOptions(run_dir=run_dir)
    with pytest.raises(InputError, match="escapes the work root"):
        run_paths(Settings(work_root=tmp_path), "id", run_dir)


def test_folder_without_structures_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match="no structure files"):
        check_inputs(StructureSource(path=str(tmp_path)), make_parameters())


def test_source_needs_exactly_one_of_path_and_text():
    with pytest.raises(ValidationError):
        StructureSource()
    with pytest.raises(ValidationError):
        StructureSource(path="a.xyz", text="1\n\nH 0 0 0\n")


def _source(path: Path) -> StructureSource:
    return StructureSource(path=str(path))


def test_a_path_outside_the_input_roots_is_refused_unread(tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("ATOMFORGE_INPUT_ROOTS", f'["{allowed}"]')
    (allowed / "water.xyz").write_text("3\n\nO 0 0 0.12\nH 0 0.76 -0.48\nH 0 -0.76 -0.48\n")
    check_inputs(_source(allowed / "water.xyz"), make_parameters(engine="emt"))
    (allowed / "shadow.xyz").symlink_to("/etc/shadow")
    for path in (Path("/etc/shadow"), allowed / "shadow.xyz", allowed / ".." / "allowed" / ".."):
        with pytest.raises(InputError, match="outside the folders runs may read") as info:
            check_inputs(_source(path), make_parameters(engine="emt"))
        assert "root:" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "1\n\nroot:$y$j9T$s3cretHash:19000:0:99999:7::: 0 0 0\n",
        "1\n\nH 0 0 s3cretHash\n",
        "root:$y$j9T$s3cretHash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    ],
)
def test_an_unreadable_file_is_described_without_its_content(tmp_path, text):
    with pytest.raises(InputError) as info:
        _check(tmp_path, text)
    assert "s3cret" not in str(info.value), str(info.value)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOMFORGE_MAX_INPUT_MB", "0.001")
    big = tmp_path / "big.xyz"
    big.write_text("2\n\nH 0 0 0\nH 0 0 0.74\n" + "#" * 2000)
    with pytest.raises(InputError, match=r"over the input limit of 0.001 MB"):
        check_inputs(_source(big), make_parameters(engine="emt"))
