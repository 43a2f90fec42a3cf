"""Engine processes use the cores a structure is given: one OpenMP thread each by default."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from ase.build import molecule
from ase.io import write

from atomforge.engines import get_engine, make_parameters
from atomforge.engines.status import JobStatus
from atomforge.flows.models import RunOptions, StructureSource
from atomforge.flows.screen import screen
from atomforge.flows.settings import get_settings
from atomforge.flows.simulate import simulate
from atomforge.flows.store.files import iter_results
from tests.conftest import use_xtb_wrapper


def test_engine_processes_default_to_one_openmp_thread():
    for name in ("xtb", "tblite", "emt"):
        command = get_engine(name).command(make_parameters(name), [Path("job")])
        assert command.env["OMP_NUM_THREADS"] == "1"


def test_openmp_threads_follow_the_cores_parameter():
    for name in ("xtb", "tblite"):
        command = get_engine(name).command(make_parameters(name, cores=2), [Path("job")])
        assert command.env["OMP_NUM_THREADS"] == "2"


SLOW_XTB = """#!/bin/sh
# Real xtb, one second late, so that overlapping runs are easy to see.
sleep 1
exec xtb "$@"
"""


def _intervals(report) -> list[tuple[float, float]]:
    """Return (start, end) of each structure's engine run, from the statuses in its folder."""
    root = get_settings().resolved_results_root()
    spans = []
    for result in iter_results(root, report.flow_run_id):
        status = JobStatus.read(Path(result.workdir))
        spans.append((status.started_at, status.started_at + status.wall_seconds))
    return sorted(spans)


def _screen_four_waters(tmp_path: Path, cores: int):
    folder = tmp_path / f"waters-{cores}"
    folder.mkdir()
    for i in range(4):
        write(folder / f"w{i}.xyz", molecule("H2O"), format="xyz")
    parameters = make_parameters("xtb", kind="singlepoint", cores=cores)
    return asyncio.run(
        screen(StructureSource(path=str(folder)), parameters, RunOptions(chunk_size=1))
    )


def test_two_core_structures_on_two_cores_run_one_at_a_time(tmp_path, monkeypatch):
    use_xtb_wrapper(tmp_path / "xtb-slow", SLOW_XTB, monkeypatch)
    report = _screen_four_waters(tmp_path, cores=2)
    assert report.n_completed == 4
    spans = _intervals(report)
    assert all(later[0] >= earlier[1] - 0.05 for earlier, later in itertools.pairwise(spans))

    report = _screen_four_waters(tmp_path, cores=1)
    spans = _intervals(report)
    assert any(later[0] < earlier[1] - 0.5 for earlier, later in itertools.pairwise(spans))


def test_more_cores_than_any_worker_has_fails_before_an_engine_starts(water_file):
    state = asyncio.run(
        simulate(
            StructureSource(path=str(water_file)),
            make_parameters("xtb", cores=3),
            return_state=True,
        )
    )
    assert state.is_failed()
    assert "cores=3: the largest Dask worker has 2 cores" in state.message
