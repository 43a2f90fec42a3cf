"""Real engines through the simulate flow, checked against independent references.

References (../shared/README.md, cross-checked there): GFN2-xTB optimized water
-5.070544 Eh with a HOMO-LUMO gap of 14.386 eV (xtb 6.5.1 and tblite 0.8.0 agree within
1e-8 Eh); ASE EMT fcc Cu lattice constant 3.5898 A.
"""

from __future__ import annotations

import asyncio
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.io import read
from ase.io.turbomole import read_turbomole_gradient

from atomforge.engines.structures import to_extxyz
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.simulate import simulate
from tests.conftest import WATER_XYZ

WATER_OPT_HARTREE = -5.070544
WATER_GAP_EV = 14.386
CU_EMT_LATTICE = 3.5898


@pytest.fixture(scope="module")
def water_singlepoints():
    """Return xtb and tblite single points (with forces) of the same water geometry."""
    source = StructureSource(text=WATER_XYZ)
    return {
        engine: asyncio.run(simulate(source, make_parameters(engine=engine, kind="singlepoint")))
        for engine in ("xtb", "tblite")
    }


def test_xtb_and_tblite_agree_on_water_energy(water_singlepoints):
    xtb, tblite = water_singlepoints["xtb"], water_singlepoints["tblite"]
    assert xtb.engine_version.startswith("6.")
    assert tblite.engine_version.startswith("tblite")
    assert abs(xtb.energy_hartree - tblite.energy_hartree) < 1e-6
    assert abs(xtb.gap_eV - tblite.gap_eV) < 1e-3


def test_xtb_forces_match_tblite_forces(water_singlepoints):
    xtb = np.array(water_singlepoints["xtb"].forces_eV_per_A)
    tblite = np.array(water_singlepoints["tblite"].forces_eV_per_A)
    assert xtb.shape == (3, 3)
    assert np.abs(xtb - tblite).max() < 1e-4
    assert np.abs(xtb.sum(axis=0)).max() < 1e-4


def test_xtb_forces_agree_with_its_turbomole_gradient_file(water_singlepoints):
    result = water_singlepoints["xtb"]
    with (Path(result.workdir) / "gradient").open() as fd:
        turbomole = read_turbomole_gradient(fd).get_forces()
    assert np.abs(np.array(result.forces_eV_per_A) - turbomole).max() < 1e-8


@pytest.mark.parametrize("engine", ["xtb", "tblite"])
def test_optimized_water_matches_the_gfn2_reference(engine):
    result = asyncio.run(simulate(StructureSource(text=WATER_XYZ), make_parameters(engine=engine)))
    assert result.status == "completed"
    assert result.converged is True
    assert result.energy_hartree == pytest.approx(WATER_OPT_HARTREE, abs=2e-6)
    assert result.gap_eV == pytest.approx(WATER_GAP_EV, abs=5e-3)
    assert result.max_force_eV_per_A < 0.05
    if engine == "tblite":
        path = read(Path(result.workdir) / "opt.extxyz", index=":", format="extxyz")
        assert len(path) == result.n_steps + 1
        assert path[-1].get_potential_energy() == pytest.approx(result.energy_eV, abs=1e-8)
        assert np.abs(path[-1].get_forces()).max() < 0.01


def test_emt_relaxes_the_copper_lattice_constant():
    start = bulk("Cu", "fcc", a=3.7)
    params = make_parameters(engine="emt", relax_cell=True, fmax=1e-4)
    result = asyncio.run(simulate(StructureSource(text=to_extxyz(start)), params))
    final = read(StringIO(result.final_structure), format="extxyz")
    lattice = final.cell.cellpar()[0] * np.sqrt(2)
    assert lattice == pytest.approx(CU_EMT_LATTICE, abs=2e-3)
    assert result.converged is True


def test_emt_energy_of_a_copper_dimer_is_reproducible_in_process():
    dimer = molecule("H2")
    dimer.set_chemical_symbols(["Cu", "Cu"])
    dimer.set_distance(0, 1, 2.3)
    result = asyncio.run(
        simulate(
            StructureSource(text=to_extxyz(dimer)),
            make_parameters(engine="emt", kind="singlepoint"),
        )
    )
    from ase.calculators.emt import EMT

    dimer.calc = EMT()
    assert result.energy_eV == pytest.approx(dimer.get_potential_energy(), abs=1e-10)
