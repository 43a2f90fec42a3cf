"""Crashes lose nothing and a retry resumes: the same flow run, run again, computes only
the structures without a completed result; every ending leaves run.json in its final
state and a document for every structure."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from ase.build import molecule
from ase.io import write
from prefect import get_client
from prefect.flow_engine import run_flow
from prefect.states import Cancelling, Scheduled

from atomforge.flows.hooks import stop_engines
from atomforge.flows.models import RunOptions, StructureSource, make_parameters
from atomforge.flows.paths import run_paths
from atomforge.flows.screen import ScreenReport, screen
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import iter_results, load_run
from tests.conftest import start_screen_process, use_xtb_wrapper

SLOW_UNTIL_TOLD = """#!/bin/sh
# Real xtb; each call is logged. A folder named *-slow waits (a minute) until {fast} exists.
basename "$PWD" >> {calls}
case "$(basename "$PWD")" in
  *-slow) for i in $(seq 600); do [ -e {fast} ] && break; sleep 0.1; done ;;
esac
exec xtb "$@"
"""


def _molecules(folder: Path, names: list[str]) -> Path:
    folder.mkdir()
    for name in names:
        write(folder / f"{name}.xyz", molecule("H2O"), format="xyz")
    return folder


def _calls(path: Path) -> list[str]:
    """Return the job folders the engine was started in, in order (not ``xtb --version``)."""
    calls = path.read_text().split() if path.exists() else []
    return [call for call in calls if call[:5].isdigit()]


def _wait(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _statuses(flow_run_id: str) -> dict[str, str]:
    root = get_settings().resolved_results_root()
    return {r.name: str(r.status) for r in iter_results(root, flow_run_id)}


def _retry(flow_run_id: str):
    """Retry a finished flow run as ``prefect flow-run retry`` does without a deployment:
    schedule it again, then run the same flow run (same id) with its own parameters."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(), force=True)
        flow_run = client.read_flow_run(flow_run_id)
    return asyncio.run(
        run_flow(screen, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
    )


def _screen_stopped_after_three(tmp_path: Path, monkeypatch, stop: signal.Signals) -> str:
    """Screen four waters in a process of its own, the fourth ("d-slow") held until
    ``tmp_path/fast`` exists; send the process ``stop`` once three completed. Return the
    flow run id (calls are logged in ``tmp_path/calls.log``)."""
    calls, fast = tmp_path / "calls.log", tmp_path / "fast"
    script = SLOW_UNTIL_TOLD.format(calls=calls, fast=fast)
    use_xtb_wrapper(tmp_path / "xtb-slow-until-told", script, monkeypatch)
    folder = _molecules(tmp_path / "set", ["a", "b", "c", "d-slow"])
    process = start_screen_process(tmp_path, folder, kind="singlepoint")
    try:
        _wait(lambda: len(set(_calls(calls))) == 4)
        flow_run_id = _flow_run_of("d-slow")
        _wait(lambda: sum(s == "completed" for s in _statuses(flow_run_id).values()) == 3)
        process.send_signal(stop)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return flow_run_id


def test_a_retried_crashed_screen_computes_only_the_unfinished_structures(tmp_path, monkeypatch):
    calls, fast = tmp_path / "calls.log", tmp_path / "fast"
    flow_run_id = _screen_stopped_after_three(tmp_path, monkeypatch, signal.SIGTERM)
    root = get_settings().resolved_results_root()
    assert load_run(root, flow_run_id).state == "Crashed"
    statuses = _statuses(flow_run_id)
    assert statuses.pop("d-slow") in {"stopped", "failed"}, "the killed one did not complete"
    assert statuses == {"a": "completed", "b": "completed", "c": "completed"}
    paths = run_paths(get_settings(), flow_run_id)
    assert paths.stop_file.exists()

    fast.touch()
    before = len(_calls(calls))
    state = _retry(flow_run_id)
    assert state.is_completed(), state.message
    assert _calls(calls)[before:] == ["00003-d-slow"]
    assert state.message == "4 of 4 completed, 0 failed"
    run = load_run(root, flow_run_id)
    assert run.state == "Completed" and run.n_completed == 4
    assert set(_statuses(flow_run_id).values()) == {"completed"}
    assert not paths.stop_file.exists()


def _flow_run_of(name: str) -> str:
    """Return the id of the (newest) run with a planned structure called ``name``."""
    for control in sorted(
        (get_settings().resolved_work_root() / ".control").glob("*/plan.json"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    ):
        if f'"name":"{name}"' in control.read_text().replace(" ", ""):
            return control.parent.name
    raise AssertionError(f"no run plans {name}")


def test_a_cancelled_run_ends_cancelled_with_a_document_for_every_structure(tmp_path, monkeypatch):
    """The flow process dies unannounced (kill -9); the worker's cancellation hook then
    finds the run from the files alone: it stops the engine, records run.json Cancelled
    (not "Cancelling") and a document for every structure."""
    flow_run_id = _screen_stopped_after_three(tmp_path, monkeypatch, signal.SIGKILL)
    root = get_settings().resolved_results_root()
    assert load_run(root, flow_run_id).state == "Running"
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    stop_engines(screen, flow_run, Cancelling(message="cancelled by the operator"))
    run = load_run(root, flow_run_id)
    assert run.state == "Cancelled"
    assert run.message == "cancelled by the operator; 3 of 4 completed"
    assert run.n_structures == 4 and run.n_completed == 3
    statuses = _statuses(flow_run_id)
    assert statuses == {"a": "completed", "b": "completed", "c": "completed", "d-slow": "stopped"}
    paths = run_paths(get_settings(), flow_run_id)
    assert not list(paths.pid_dir.glob("*.json"))


FAIL_SOME = """#!/bin/sh
# Real xtb, except that a folder named *-bad fails at once.
basename "$PWD" >> {calls}
case "$(basename "$PWD")" in
  *-bad) echo "ERROR: told to fail" >&2; exit 3 ;;
esac
exec xtb "$@"
"""


def test_a_screen_fails_past_its_failure_fraction_and_says_how_many_failed(tmp_path, monkeypatch):
    use_xtb_wrapper(tmp_path / "xtb-fail-some", FAIL_SOME.format(calls=tmp_path / "c"), monkeypatch)
    folder = _molecules(tmp_path / "set", ["a", "b-bad", "c-bad"])
    (folder / "broken.xyz").write_text("2\n\nH 0 0 0\nH 0 0 0.05\n")
    source, params = StructureSource(path=str(folder)), make_parameters(kind="singlepoint")
    root = get_settings().resolved_results_root()

    state = asyncio.run(screen(source, params, RunOptions(skip_invalid=True), return_state=True))
    assert state.is_failed()
    assert state.message == (
        "2 of 3 failed, more than max_failed_fraction 0.5 allows (1 completed, 1 invalid skipped)"
    )
    report = state.result(raise_on_failure=False)
    assert isinstance(report, ScreenReport) and report.n_completed == 1
    assert load_run(root, report.flow_run_id).state == "Failed"

    tolerant = RunOptions(skip_invalid=True, max_failed_fraction=1.0)
    state = asyncio.run(screen(source, params, tolerant, return_state=True))
    assert state.is_completed()
    assert state.message == "1 of 3 completed, 2 failed, 1 invalid skipped"
    run = load_run(root, state.result().flow_run_id)
    assert run.state == "Completed" and run.message == state.message


def test_verdict_counts_failures_against_the_structures_computed():
    from atomforge.flows.models import StructureResult
    from atomforge.flows.pipeline import verdict

    def results(*statuses: str) -> list[StructureResult]:
        common = {"flow_run_id": "r", "flow_name": "screen", "engine": "xtb"}
        return [
            StructureResult(
                id=str(i),
                index=i,
                name=str(i),
                status=status,
                parameters={},
                formula="H2",
                n_atoms=2,
                input_structure="",
                **common,
            )
            for i, status in enumerate(statuses)
        ]

    assert verdict(results("completed", "failed"), 0.5) == (True, "1 of 2 completed, 1 failed")
    assert verdict(results("completed", "timeout", "not-started"), 0.5)[0] is False
    assert verdict(results("completed", "invalid", "invalid"), 0.0)[0] is True
    assert verdict(results("invalid"), 0.5) == (False, "no structure to compute, 1 invalid skipped")
    assert verdict(results("completed", "stopped"), 0.0)[0] is False


def test_a_results_folder_that_cannot_be_written_fails_before_any_engine_starts(
    tmp_path, monkeypatch
):
    calls = tmp_path / "calls.log"
    use_xtb_wrapper(tmp_path / "xtb-logged", FAIL_SOME.format(calls=calls), monkeypatch)
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    monkeypatch.setenv("ATOMFORGE_RESULTS_ROOT", str(in_the_way / "results"))
    folder = _molecules(tmp_path / "set", ["a", "b"])
    state = asyncio.run(
        screen(
            StructureSource(path=str(folder)),
            make_parameters(kind="singlepoint"),
            return_state=True,
        )
    )
    assert state.is_failed()
    assert f"results root {in_the_way / 'results'}: cannot be made" in state.message
    assert _calls(calls) == []
