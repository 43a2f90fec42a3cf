"""Reuse of stored results: identical inputs are not computed again, and a rerun of a
stopped screen computes only what is missing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from ase.build import molecule
from ase.io import write

from atomforge.engines import make_parameters
from atomforge.engines.process import kill_recorded
from atomforge.flows.models import RunOptions, StructureSource
from atomforge.flows.screen import screen
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import iter_results, query_results
from atomforge.flows.store.keys import input_key
from tests.conftest import start_screen_process, use_xtb_wrapper

MOLECULES = ("H2O", "CH4", "NH3", "CO2")


@pytest.fixture(autouse=True)
def _reuse_on_with_a_store_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOMFORGE_REUSE", "true")
    monkeypatch.setenv("ATOMFORGE_HOME", str(tmp_path / "home"))


def _folder(tmp_path: Path, names=MOLECULES) -> Path:
    folder = tmp_path / "set"
    folder.mkdir(exist_ok=True)
    for name in names:
        write(folder / f"{name}.xyz", molecule(name), format="xyz")
    return folder


def _documents(flow_run_id: str) -> dict[str, object]:
    root = get_settings().resolved_results_root()
    return {r.name: r for r in iter_results(root, flow_run_id)}


def test_a_second_screen_reuses_every_stored_result(tmp_path):
    folder = _folder(tmp_path)
    params = make_parameters("xtb", kind="singlepoint")
    first = asyncio.run(screen(StructureSource(path=str(folder)), params))
    second = asyncio.run(screen(StructureSource(path=str(folder)), params))
    assert second.n_completed == 4
    before, after = _documents(first.flow_run_id), _documents(second.flow_run_id)
    for name in MOLECULES:
        assert after[name].reused_from == f"{first.flow_run_id}/{before[name].id}"
        assert after[name].energy_eV == before[name].energy_eV
        assert after[name].input_key == before[name].input_key
        assert after[name].workdir == before[name].workdir
    work = get_settings().resolved_work_root() / second.flow_run_id
    assert not work.exists() or not any(work.iterdir())


def test_cleaning_a_run_leaves_the_work_of_the_run_it_reused(tmp_path, monkeypatch):
    folder = _folder(tmp_path, ("H2O",))
    params = make_parameters("xtb", kind="singlepoint")
    first = asyncio.run(screen(StructureSource(path=str(folder)), params))
    monkeypatch.setenv("ATOMFORGE_KEEP_WORKDIR", "never")
    second = asyncio.run(screen(StructureSource(path=str(folder)), params))
    kept = _documents(first.flow_run_id)["H2O"].workdir
    assert _documents(second.flow_run_id)["H2O"].reused_from
    assert Path(kept, "xtb.log").exists()


def test_no_reuse_and_changed_parameters_compute_again(tmp_path):
    folder = _folder(tmp_path, ("H2O",))
    params = make_parameters("xtb", kind="singlepoint")
    first = asyncio.run(screen(StructureSource(path=str(folder)), params))
    fresh = asyncio.run(screen(StructureSource(path=str(folder)), params, RunOptions(reuse=False)))
    assert _documents(fresh.flow_run_id)["H2O"].reused_from is None
    other = make_parameters("xtb", kind="singlepoint", options={"method": "GFN1-xTB"})
    changed = asyncio.run(screen(StructureSource(path=str(folder)), other))
    assert _documents(changed.flow_run_id)["H2O"].reused_from is None
    assert first.results[0].energy_eV != changed.results[0].energy_eV


def test_input_key_ignores_cores_and_time_limit_but_not_geometry():
    water = molecule("H2O")
    base = input_key(water, make_parameters("xtb"), "6.5.1")
    assert base == input_key(water, make_parameters("xtb", cores=2, timeout_seconds=9), "6.5.1")
    assert base != input_key(water, make_parameters("xtb"), "6.6.0")
    moved = water.copy()
    moved.positions[0, 0] += 1e-5
    assert base != input_key(moved, make_parameters("xtb"), "6.5.1")
    nudged = water.copy()
    nudged.positions[0, 0] += 1e-9
    assert base == input_key(nudged, make_parameters("xtb"), "6.5.1")


SLOW_FOR_LATER = """#!/bin/sh
# Real xtb; the structures after the first two take 30 s, so the screen can be killed.
case "$(basename "$PWD")" in
  00000-*|00001-*) ;;
  [0-9]*) sleep 30 ;;
esac
exec xtb "$@"
"""


def test_rerunning_a_killed_screen_computes_only_what_is_missing(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    wrapper = use_xtb_wrapper(tmp_path / "xtb-slow-later", SLOW_FOR_LATER, monkeypatch)
    process = start_screen_process(tmp_path, folder, engine="xtb", kind="singlepoint")
    root = get_settings().resolved_results_root()
    deadline = time.monotonic() + 120
    while len(query_results(root, status="completed")) < 2:
        log = (tmp_path / "screen_process.log").read_text()[-3000:]
        assert time.monotonic() < deadline and process.poll() is None, log
        time.sleep(0.2)
    helpers = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    for control in (get_settings().resolved_work_root() / ".control").iterdir():
        kill_recorded(control / "pids")
    for helper in helpers:
        with contextlib.suppress(psutil.Error):
            helper.kill()
    done = {r.formula for r in query_results(root, status="completed")}

    monkeypatch.setenv("ATOMFORGE_XTB_COMMAND", "xtb")
    wrapper.unlink()
    report = asyncio.run(
        screen(StructureSource(path=str(folder)), make_parameters("xtb", kind="singlepoint"))
    )
    assert report.n_completed == 4
    documents = _documents(report.flow_run_id).values()
    assert {d.formula for d in documents if d.reused_from} == done
    assert len([d for d in documents if d.reused_from is None]) == 4 - len(done)
