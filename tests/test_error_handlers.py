"""Error handlers: a known engine failure is provoked for real, corrected, and recorded."""

from __future__ import annotations

import asyncio

import pytest

from atomforge.engines import make_parameters
from atomforge.flows.models import StructureSource
from atomforge.flows.simulate import simulate
from tests.conftest import WATER_XYZ

DISTORTED_WATER_XYZ = "3\ndistorted water\nO 0 0 0\nH 0 1.1 0.3\nH 0 -1.0 0.4\n"


def _simulate(monkeypatch, max_corrections: int, text: str = WATER_XYZ, **parameters):
    monkeypatch.setenv("ATOMFORGE_MAX_CORRECTIONS", str(max_corrections))
    return asyncio.run(
        simulate(StructureSource(text=text), make_parameters(**parameters), return_state=True)
    )


def _document(state):
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import query_results

    root = get_settings().resolved_results_root()
    (result,) = query_results(root, flow_run_id=str(state.state_details.flow_run_id))
    return result


def test_xtb_scf_failure_is_rerun_hotter_and_recorded(monkeypatch):
    state = _simulate(
        monkeypatch, 3, engine="xtb", kind="singlepoint", options={"max_iterations": 3}
    )
    assert state.is_completed()
    result = _document(state)
    first = result.corrections[0]
    assert first["problem"] == "scf_not_converged"
    assert first["options"] == {"electronic_temperature": 900.0, "max_iterations": 6}
    assert result.parameters["options"]["max_iterations"] == 3
    assert result.energy_eV is not None


def test_xtb_scf_failure_fails_with_the_reason_when_corrections_are_used_up(monkeypatch):
    state = _simulate(
        monkeypatch, 0, engine="xtb", kind="singlepoint", options={"max_iterations": 3}
    )
    assert state.is_failed()
    result = _document(state)
    assert result.status == "failed"
    assert result.message == "xtb: SCC did not converge"
    assert result.corrections == []


def test_optimization_out_of_steps_continues_from_its_last_geometry(monkeypatch):
    state = _simulate(monkeypatch, 3, DISTORTED_WATER_XYZ, engine="xtb", max_steps=3)
    assert state.is_completed()
    result = _document(state)
    assert result.corrections[0]["problem"] == "optimization_not_converged"
    assert result.corrections[0]["action"] == "continue from the last geometry"
    assert result.converged is True
    # GFN2-xTB optimized water, xtb 6.5.1 (../shared/README.md)
    assert result.energy_hartree == pytest.approx(-5.070544351, abs=2e-5)


def test_optimization_out_of_steps_fails_with_every_correction_in_its_message(monkeypatch):
    state = _simulate(monkeypatch, 1, DISTORTED_WATER_XYZ, engine="xtb", max_steps=1)
    result = _document(state)
    assert result.status == "failed"
    assert result.message.startswith("xtb: optimization not converged in 1 steps")
    assert "(after 1 correction(s): continue from the last geometry)" in result.message
    assert len(result.corrections) == 1


def test_ase_engine_optimization_out_of_steps_is_continued(monkeypatch):
    from ase.build import bulk

    from atomforge.engines.structures import to_extxyz

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.rattle(0.05, seed=1)
    monkeypatch.setenv("ATOMFORGE_MAX_CORRECTIONS", "5")
    state = asyncio.run(
        simulate(
            StructureSource(text=to_extxyz(atoms)),
            make_parameters("emt", max_steps=3, fmax=0.05),
            return_state=True,
        )
    )
    assert state.is_completed()
    result = _document(state)
    assert result.corrections and result.corrections[0]["problem"] == "optimization_not_converged"
    assert result.converged is True
