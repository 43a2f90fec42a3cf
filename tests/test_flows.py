"""simulate and screen on the embedded Prefect API and a local Dask cluster."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from ase.build import molecule
from ase.io import write
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)

from atomforge.flows.models import RunOptions, StructureSource, make_parameters
from atomforge.flows.screen import screen
from atomforge.flows.settings import get_settings
from atomforge.flows.simulate import simulate
from atomforge.flows.store.files import iter_results, iter_runs, load_run, query_results
from tests.conftest import WATER_XYZ, start_screen_process, water_cluster_xyz


def _artifacts(flow_run_id: str) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


def _task_names(flow_run_id: str) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return sorted(r.name.rsplit("-", 1)[0] for r in runs)


def test_simulate_runs_four_steps_and_stores_inputs_and_results(water_file):
    state = asyncio.run(
        simulate(StructureSource(path=str(water_file)), make_parameters(), return_state=True)
    )
    assert state.is_completed()
    result = state.result()
    flow_run_id = result.flow_run_id
    assert _task_names(flow_run_id) == ["parse-results", "prepare-inputs", "run-engine", "validate"]

    stored = query_results(get_settings().resolved_results_root(), flow_run_id=flow_run_id)
    assert [r.id for r in stored] == [result.id]
    document = json.loads(
        (get_settings().resolved_results_root() / flow_run_id / f"{result.id}.json").read_text()
    )
    assert document["engine"] == "xtb" and document["engine_version"].startswith("6.")
    assert document["parameters"]["kind"] == "optimize"
    assert document["input_structure"].startswith("3\n")
    assert document["formula"] == "H2O"
    run = load_run(get_settings().resolved_results_root(), flow_run_id)
    assert run.state == "Completed" and run.result_ids == [result.id]
    workdir = Path(result.workdir)
    assert (workdir / "xtb.log").read_text().count("normal termination of xtb") == 1

    artifacts = _artifacts(flow_run_id)
    keys = {"simulate-table", "simulate-summary", "simulate-progress", "simulate-files"}
    assert keys <= set(artifacts)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).name == "simulate xtb optimize: water.xyz"
    assert artifacts["simulate-progress"].data == 100.0
    table = artifacts["simulate-table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert rows[0]["formula"] == "H2O" and rows[0]["status"] == "completed"
    assert rows[0]["converged"] is True and isinstance(rows[0]["energy_eV"], float)
    assert rows[0]["result"] == f"{flow_run_id}/{result.id}"
    assert "1 of 1" in artifacts["simulate-summary"].data
    assert f"atomforge results --run {flow_run_id}" in artifacts["simulate-files"].data
    assert all(artifact.description for artifact in artifacts.values())


def _run_log_containing(flow_run_id: str, text: str, timeout: float = 20) -> str | None:
    """Return the first log message of the run that contains ``text`` (logs arrive late)."""
    import time

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=log_filter)
        found = [log.message for log in logs if text in log.message]
        if found:
            return found[0]
        time.sleep(0.5)
    return None


def test_engine_output_is_streamed_to_the_run_logs_when_asked(monkeypatch, water_file):
    monkeypatch.setenv("ATOMFORGE_ENGINE_LOG_CHARS", "65536")
    result = asyncio.run(
        simulate(StructureSource(path=str(water_file)), make_parameters(kind="singlepoint"))
    )
    message = _run_log_containing(result.flow_run_id, "normal termination of xtb")
    assert message is not None
    assert "not sent" not in message
    assert "* xtb version" in message


def test_engine_output_beyond_the_cap_keeps_its_latest_lines(monkeypatch, water_file):
    monkeypatch.setenv("ATOMFORGE_ENGINE_LOG_CHARS", "2000")
    result = asyncio.run(
        simulate(StructureSource(path=str(water_file)), make_parameters(kind="singlepoint"))
    )
    message = _run_log_containing(result.flow_run_id, "normal termination of xtb")
    assert message is not None
    assert "earlier line(s) not sent" in message
    assert len(message) < 2300
    log_file = Path(result.workdir) / "xtb.log"
    assert "* xtb version" in log_file.read_text()


def test_parse_takes_completed_structures_of_every_chunk_while_the_engines_still_run(tmp_path):
    from atomforge.engines import get_engine
    from atomforge.engines.runloop import RunControl, run_jobs
    from atomforge.engines.status import JobStatus
    from atomforge.engines.structures import NamedStructure, read_structures
    from atomforge.flows.jobs import RunContext, plan_jobs
    from atomforge.flows.paths import run_paths
    from atomforge.flows.settings import Settings
    from atomforge.flows.steps import parse_results, prepare_inputs

    settings = Settings(home=tmp_path)
    paths = run_paths(settings, "streaming")
    params = make_parameters(kind="singlepoint")
    atoms = read_structures(None, WATER_XYZ, None)[0].atoms
    names = [NamedStructure(n, atoms.copy()) for n in ("done", "failed", "pending", "other")]
    done, failed, pending, other = jobs = plan_jobs(names, 0, paths)
    asyncio.run(prepare_inputs.fn(jobs, params))
    control = RunControl(paths.pid_dir, paths.stop_file, lambda text: None, lambda d, s: None)
    run_jobs(get_engine("xtb"), [done.directory, other.directory], params, control)
    JobStatus("failed", "engine failed (exit code 1)").write(failed.directory)
    run = RunContext("streaming", "screen", paths, settings.resolved_results_root())
    stored = settings.resolved_results_root() / "streaming"
    checks = []

    def engines_finished() -> bool:
        checks.append(sorted(p.stem for p in stored.glob("*.json")))
        return len(checks) > 1

    results = asyncio.run(
        parse_results.fn(
            [[done, failed, pending], [other]], params, run, engines_finished=engines_finished
        )
    )
    assert checks[1] == ["00000-done", "00003-other"]
    assert [(r.name, r.status) for r in results] == [
        ("done", "completed"),
        ("other", "completed"),
        ("failed", "failed"),
    ]
    assert results[0].energy_hartree is not None and results[0].gap_eV is not None
    assert not (stored / f"{pending.index:05d}-pending.json").exists()


def test_flow_results_are_persisted_as_json_not_pickle(water_file):
    state = asyncio.run(
        simulate(
            StructureSource(path=str(water_file)),
            make_parameters(kind="singlepoint"),
            return_state=True,
        )
    )
    metadata = state.data.metadata
    assert metadata.serializer.type == "json"
    payload = json.loads(Path(metadata.storage_key).read_text())
    assert payload["data"]["id"] == state.result().id
    assert payload["data"]["energy_hartree"] == state.result().energy_hartree


def test_screen_ranks_a_folder_and_reports_invalid_structures(tmp_path):
    for name in ("H2O", "CH4", "NH3", "CO"):
        write(tmp_path / f"{name}.xyz", molecule(name), format="xyz")
    (tmp_path / "broken.xyz").write_text("2\n\nH 0 0 0\nH 0 0 0.05\n")
    report = asyncio.run(
        screen(
            StructureSource(path=str(tmp_path)),
            make_parameters(engine="xtb", kind="singlepoint"),
            RunOptions(skip_invalid=True, chunk_size=2),
            rank_by="gap",
        )
    )
    assert report.n_structures == 5 and report.n_completed == 4
    gaps = [r.gap_eV for r in report.results[:4]]
    assert gaps == sorted(gaps, reverse=True)
    assert report.results[-1].name == "broken" and report.results[-1].status == "invalid"
    assert "overlap" in report.results[-1].message
    assert _task_names(report.flow_run_id).count("run-engine") == 2


def test_screen_reads_a_multi_frame_extxyz_with_tblite(tmp_path):
    frames = [molecule(name) for name in ("H2O", "H2", "CH4")]
    for atoms, name in zip(frames, ("water", "hydrogen", "methane")):
        atoms.info["name"] = name
    write(tmp_path / "set.extxyz", frames, format="extxyz")
    report = asyncio.run(
        screen(
            StructureSource(path=str(tmp_path / "set.extxyz")),
            make_parameters(engine="tblite", kind="singlepoint"),
        )
    )
    assert report.n_completed == 3
    assert {r.name for r in report.results} == {"water", "hydrogen", "methane"}
    energies = [r.energy_per_atom_eV for r in report.results]
    assert energies == sorted(energies)
    stored = {
        r.id: r for r in iter_results(get_settings().resolved_results_root(), report.flow_run_id)
    }
    for line in report.results:
        document = stored[line.id]
        assert document.energy_eV == line.energy_eV and document.name == line.name
        assert document.final_structure and len(document.forces_eV_per_A) == document.n_atoms


def test_bad_input_fails_the_flow_and_leaves_other_runs_intact(tmp_path, water_file):
    good = asyncio.run(
        simulate(StructureSource(path=str(water_file)), make_parameters(kind="singlepoint"))
    )
    root = get_settings().resolved_results_root()
    before = {p: p.read_bytes() for p in (root / good.flow_run_id).iterdir()}
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    state = asyncio.run(
        simulate(StructureSource(path=str(empty)), make_parameters(), return_state=True)
    )
    assert state.is_failed()
    assert "structure file is empty" in state.message
    assert {p: p.read_bytes() for p in (root / good.flow_run_id).iterdir()} == before


@pytest.mark.parametrize(("policy", "kept"), [("never", False), ("on_failure", False)])
def test_workdir_is_cleaned_as_configured(monkeypatch, water_file, policy, kept):
    monkeypatch.setenv("ATOMFORGE_KEEP_WORKDIR", policy)
    result = asyncio.run(
        simulate(StructureSource(path=str(water_file)), make_parameters(kind="singlepoint"))
    )
    assert result.workdir is None
    run = load_run(get_settings().resolved_results_root(), result.flow_run_id)
    assert Path(run.work_dir).exists() is kept


def test_engine_timeout_kills_the_engine_and_fails_clearly():
    from tests.conftest import water_cluster_xyz

    params = make_parameters(engine="xtb", timeout_seconds=2)
    state = asyncio.run(
        simulate(StructureSource(text=water_cluster_xyz(3)), params, return_state=True)
    )
    assert state.is_failed()
    assert "timeout" in state.message
    result = query_results(
        get_settings().resolved_results_root(), flow_run_id=str(state.state_details.flow_run_id)
    )[0]
    assert result.status == "timeout" and result.wall_seconds < 10


def test_a_timeout_shorter_than_the_engine_run_is_enforced_even_if_it_ends_first():
    """`--timeout 0.001` on water: xtb needs longer than a millisecond, so it timed out,
    even when it exits before the first check."""
    params = make_parameters(engine="xtb", kind="singlepoint", timeout_seconds=0.001)
    state = asyncio.run(simulate(StructureSource(text=WATER_XYZ), params, return_state=True))
    assert state.is_failed()
    (result,) = query_results(
        get_settings().resolved_results_root(), flow_run_id=str(state.state_details.flow_run_id)
    )
    assert result.status == "timeout"


def test_importing_the_flows_reads_no_settings_and_starts_nothing(tmp_path):
    import os
    import subprocess
    import sys

    home = tmp_path / "not-yet"
    check = (
        "import os, sys\n"
        "import atomforge.flows.screen, atomforge.flows.simulate as s\n"
        "assert not os.path.exists(sys.argv[1]), 'settings read at import'\n"
        "assert s.simulate.task_runner._cluster is None and not s.simulate.task_runner._started\n"
        "print(type(s.simulate.task_runner).__name__)\n"
    )
    env = os.environ | {"ATOMFORGE_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-c", check, str(home)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SettingsDaskTaskRunner"


AR2_LJ = """2
Lattice="10 0 0 0 10 0 0 0 10" Properties=species:S:1:pos:R:3 pbc="T T T"
Ar       0.0       0.0       0.0
Ar       0.0       0.0       3.0
"""
LJ_OVERFLOW = {"pair_style": "lj/cut 4.0", "pair_coeff": ["* * 1e308 3.4"]}
"""Two argon atoms under a Lennard-Jones well of 1e308 eV: LAMMPS's energy overflows
(4 eps (sigma/r)^12 is past the largest double) and it prints a NaN energy, in IEEE
arithmetic on any machine. (A rattled H2 that Debian's xtb 6.5.1 optimizes to NaN on some
CPUs converges on others, so it cannot stand for an engine returning NaN.)"""


def test_engine_that_returns_nan_energy_fails_the_structure_with_a_stored_readable_document():
    params = make_parameters("lammps", kind="singlepoint", options=LJ_OVERFLOW)
    state = asyncio.run(simulate(StructureSource(text=AR2_LJ), params, return_state=True))
    assert state.is_failed()
    root = get_settings().resolved_results_root()
    (result,) = query_results(root, flow_run_id=str(state.state_details.flow_run_id))
    assert result.status == "failed"
    assert result.message == "lammps finished but returned a non-finite energy (nan)"
    assert result.energy_eV is None and result.forces_eV_per_A is None


def _run_logs(flow_run_id: str) -> list[str]:
    """Return every log message of a flow run and of its task runs."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=log_filter)]


def test_run_log_tells_the_story_without_engine_output(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("H2O", "NH3", "CH4", "CO2"):
        write(folder / f"{name}.xyz", molecule(name), format="xyz")
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")
    monkeypatch.setenv("ATOMFORGE_HOME", str(tmp_path / "home"))
    assert start_screen_process(tmp_path, folder, engine="xtb").wait(timeout=300) == 0
    (run,) = iter_runs(get_settings().resolved_results_root())
    assert _run_log_containing(run.flow_run_id, "4 structure(s) valid for xtb")
    assert _run_log_containing(run.flow_run_id, "Finished in state Completed")
    messages = _run_logs(run.flow_run_id)
    assert not any("xtb version" in message for message in messages)
    assert sum(len(message) for message in messages) < 5000


def test_a_failed_structure_logs_its_last_engine_lines(tmp_path):
    structure = tmp_path / "cluster.xyz"
    structure.write_text(water_cluster_xyz(4))
    # an optimization of 64 waters takes xtb minutes; its single point fits in 1 s on a fast CPU
    params = make_parameters("xtb", kind="optimize", timeout_seconds=1)
    state = asyncio.run(simulate(StructureSource(path=str(structure)), params, return_state=True))
    assert state.is_failed()
    flow_run_id = str(state.state_details.flow_run_id)
    message = _run_log_containing(flow_run_id, "00000-cluster: timeout")
    assert message is not None
    assert "last " in message and "xtb.log:" in message
    tail = message.split("xtb.log:\n", 1)[1].splitlines()
    assert 0 < len(tail) <= 20
    (result,) = query_results(get_settings().resolved_results_root(), flow_run_id=flow_run_id)
    written = [line for line in (Path(result.workdir) / "xtb.log").read_text().splitlines()]
    assert tail == [line for line in written if line.strip()][-len(tail) :]


def test_a_big_screens_table_shows_its_first_rows_and_says_so(monkeypatch):
    """A 10,000-structure table (3.4 MB) is more than the UI (and Prefect's event bus, which
    refuses it) takes: the table holds the ranking's first ATOMFORGE_TABLE_ROWS."""
    monkeypatch.setenv("ATOMFORGE_TABLE_ROWS", "2")
    three = WATER_XYZ + WATER_XYZ.replace("water", "w2") + WATER_XYZ.replace("water", "w3")
    report = asyncio.run(
        screen(StructureSource(text=three), make_parameters(engine="emt", kind="singlepoint"))
    )
    table = _artifacts(report.flow_run_id)["screen-table"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["rank"] for row in rows] == [1, 2]
    assert table.description.endswith("the first 2 of 3")


def test_results_table_puts_the_ranking_column_after_the_name_and_keeps_numbers():
    from atomforge.engines.status import Status
    from atomforge.flows.models import StructureResult
    from atomforge.flows.ui.artifacts import result_rows

    def result(name: str, gap: float | None, status: str = "completed") -> StructureResult:
        return StructureResult.model_construct(
            id=f"00000-{name}",
            flow_run_id="run",
            name=name,
            formula=name,
            status=Status(status),
            energy_eV=-1.23456789,
            energy_per_atom_eV=-0.5,
            gap_eV=gap,
            converged=True,
            n_steps=3,
            wall_seconds=0.123,
            message="",
            max_force_eV_per_A=None,
        )

    rows = result_rows([result("a", 5.0), result("b", 1.0), result("c", None, "failed")], "gap_eV")
    assert list(rows[0])[:3] == ["name", "gap_eV", "rank"]
    assert [row["rank"] for row in rows] == [1, 2, None]
    assert rows[0]["energy_eV"] == -1.234568 and rows[0]["converged"] is True
    assert rows[2]["gap_eV"] is None and rows[0]["result"] == "run/00000-a"
