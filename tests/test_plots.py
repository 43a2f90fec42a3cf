"""A run's plots: PNG files in its results folder and shown in its plots artifact."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from PIL import Image
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.screen import screen
from atomforge.flows.settings import get_settings
from atomforge.flows.simulate import simulate
from atomforge.flows.ui.artifacts import MAX_EMBEDDED_BYTES
from tests.conftest import REPO, use_xtb_wrapper

FAILS_FOR_BAD = """#!/bin/sh
# Real xtb, except in a folder named *-bad, where it fails.
case "$(basename "$PWD")" in
  *-bad) echo "broken on purpose" >&2; exit 1 ;;
esac
exec xtb "$@"
"""


def _plots_artifact(flow_run_id: str, key: str) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return next(a.data for a in found if a.key == key)


def _assert_png(path: Path, size: tuple[int, int]) -> None:
    assert 10_000 < path.stat().st_size < MAX_EMBEDDED_BYTES, path.stat().st_size
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def _folder(flow_run_id: str) -> Path:
    return get_settings().resolved_results_root() / flow_run_id


def test_screen_draws_its_ranking_with_the_failures_named(tmp_path, monkeypatch):
    use_xtb_wrapper(tmp_path / "xtb-fails-for-bad", FAILS_FOR_BAD, monkeypatch)
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("CH4", "H2O", "NH3"):
        shutil.copy(REPO / "examples" / "molecules" / f"{name}.xyz", folder)
    shutil.copy(REPO / "examples" / "molecules" / "CO2.xyz", folder / "CO2-bad.xyz")
    state = asyncio.run(
        screen(
            StructureSource(path=str(folder)),
            make_parameters(kind="singlepoint"),
            return_state=True,
        )
    )
    report = state.result(raise_on_failure=False)
    assert report.n_completed == 3
    ranking = _folder(report.flow_run_id) / "ranking.png"
    _assert_png(ranking, (700, 420))
    shown = _plots_artifact(report.flow_run_id, "screen-plots")
    assert "](data:image/png;base64," in shown and f"`{ranking}`" in shown


def test_optimization_draws_its_energy_at_each_step_even_without_its_folder(
    water_file, monkeypatch
):
    monkeypatch.setenv("ATOMFORGE_KEEP_WORKDIR", "never")
    result = asyncio.run(simulate(StructureSource(path=str(water_file)), make_parameters()))
    assert result.workdir is None and result.n_steps >= 2
    trace = _folder(result.flow_run_id) / f"{result.id}-optimization.png"
    _assert_png(trace, (700, 420))
    assert f"`{trace}`" in _plots_artifact(result.flow_run_id, "simulate-plots")


def test_md_run_draws_its_temperature_and_energy():
    params = make_parameters(
        "lammps",
        kind="md",
        options={"potential": "Cu_u3.eam", "temperature": 300, "steps": 100, "thermo_every": 10},
    )
    result = asyncio.run(simulate(StructureSource(path=str(REPO / "examples/cu.extxyz")), params))
    assert len(result.properties["thermo"]["temperature_K"]) >= 10
    _assert_png(_folder(result.flow_run_id) / f"{result.id}-md.png", (700, 720))


def test_no_plots_when_turned_off(water_file, monkeypatch):
    monkeypatch.setenv("ATOMFORGE_PLOTS", "false")
    result = asyncio.run(simulate(StructureSource(path=str(water_file)), make_parameters()))
    assert not list(_folder(result.flow_run_id).glob("*.png"))
