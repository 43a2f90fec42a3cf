"""The warm consumer for real: the service runs deployment runs in children forked from it
(no worker launch), a cancel stops a run and its engine, a suspended run is suspended and
resumes, a killed child or consumer ends its run Crashed with its engine stopped, and a
run with job variables of its own is left to the worker."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from tests.conftest import WATER_XYZ, water_cluster_xyz
from tests.prefect_server import (
    api_get,
    api_post,
    prefect_cli,
    running_service,
    service,
    wait_final,
)
from tests.test_cli_signals import wait_until
from tests.test_warm_exec import _engine_of, _forked, _result, _simulate, _wait_gone

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack():
    """The service, its worker asking for runs every 30 s (so that it does not win a run
    from the consumer by chance: both take what the pool offers) and its consumer asking
    unprompted only every hour (so that it takes each run on the server's word that it
    was scheduled, or when a child ended); yield (client environment, atomforge home,
    service folder)."""
    settings = {"worker_query_seconds": "30", "idle_poll_seconds": "3600"}
    with running_service(**settings) as (env, folder):
        yield env, Path(env["ATOMFORGE_HOME"]), folder / "service"


def _consumer(service_dir: Path) -> psutil.Process:
    return psutil.Process(int((service_dir / "consumer.pid").read_text()))


def _consumed(service_dir: Path, flow_run_id: str) -> bool:
    return f"flow run {flow_run_id} (" in (service_dir / "consumer.log").read_text()


def _running_cluster_run(env: dict[str, str], home: Path, folder: Path) -> tuple[str, object]:
    """Submit a slow run (four waters); return its id and its xtb process once it runs."""
    structure = folder / "cluster.xyz"
    structure.write_text(water_cluster_xyz(4))
    flow_run_id = _simulate(env, structure)
    return flow_run_id, _engine_of(env, home, flow_run_id)


def _logged(env: dict[str, str], flow_run_id: str, text: str) -> bool:
    """Return whether the server holds a log line of the run containing ``text``, waiting
    up to 30 s for it (its child sends the last lines as it ends)."""
    deadline = time.monotonic() + 30
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
    while time.monotonic() < deadline:
        if any(text in log["message"] for log in api_post(env, "/logs/filter", body)):
            return True
        time.sleep(0.5)
    return False


def test_a_deployment_run_runs_in_a_child_of_the_consumer(stack, tmp_path):
    env, home, service_dir = stack
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    flow_run_id = _simulate(env, structure)
    state = wait_final(env, flow_run_id)
    assert state["type"] == "COMPLETED", state
    assert _consumed(service_dir, flow_run_id)
    assert not _forked(service_dir, flow_run_id)
    states = api_get(env, f"/flow_run_states/?flow_run_id={flow_run_id}")
    assert any("claimed by consumer" in (s.get("message") or "") for s in states)
    assert _logged(env, flow_run_id, "running xtb on a chunk of 1 structure(s)")
    # GFN2-xTB water, xtb 6.5.1 (tests/test_reference_numbers.py)
    assert _result(home, flow_run_id)["energy_hartree"] == pytest.approx(-5.070544, abs=2e-6)
    runs_dir = service_dir / "consumer-runs"  # the record goes when the child is reaped
    assert wait_until(lambda: not any(runs_dir.iterdir()), timeout=30)


def test_a_tblite_run_forks_its_runner_zygote_from_its_child(stack, tmp_path):
    """A child of the consumer forks the runner zygote from itself (no new Python, no
    imports): water computes the GFN2 reference, and a cancelled run of 64 waters stops
    the runner and the zygote."""
    env, home, service_dir = stack
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    water = _simulate(env, structure, engine="tblite")
    assert wait_final(env, water)["type"] == "COMPLETED"
    # GFN2-xTB optimized water: xtb 6.5.1 and tblite 0.8.0 (tests/test_reference_numbers.py)
    assert _result(home, water)["energy_hartree"] == pytest.approx(-5.070544, abs=2e-6)
    cluster = tmp_path / "cluster.xyz"
    cluster.write_text(water_cluster_xyz(4))
    flow_run_id = _simulate(env, cluster, engine="tblite")
    pid_dir = home / "work" / ".control" / flow_run_id / "pids"
    assert wait_until(lambda: any(pid_dir.glob("*.json")), timeout=180)
    runner = psutil.Process(json.loads(next(pid_dir.glob("*.json")).read_text())["pid"])
    zygote = runner.parent()
    child = zygote.parent()
    assert child.parent().pid == _consumer(service_dir).pid
    assert zygote.cmdline() == _consumer(service_dir).cmdline()  # forked, not started anew
    prefect_cli(env, "flow-run", "cancel", flow_run_id)
    assert wait_final(env, flow_run_id, timeout=120)["type"] == "CANCELLED"
    _wait_gone(runner)
    _wait_gone(zygote)


def test_cancelling_a_consumer_run_stops_it_and_its_engine(stack, tmp_path):
    env, home, service_dir = stack
    flow_run_id, engine = _running_cluster_run(env, home, tmp_path)
    assert _consumer(service_dir).pid in [p.pid for p in engine.parents()]
    prefect_cli(env, "flow-run", "cancel", flow_run_id)
    state = wait_final(env, flow_run_id, timeout=120)
    assert state["type"] == "CANCELLED", state
    _wait_gone(engine)
    summary = home / "results" / flow_run_id / "run.json"
    assert '"Cancelled"' in summary.read_text()


def test_a_suspended_run_is_suspended_and_resumes_to_its_result(stack, tmp_path):
    """Suspended as the UI's Suspend button does it, while its xtb optimizes 27 waters:
    the consumer tells the child, the flow engine suspends the run at its next step (the
    end of its parse step) and the child ends; resumed, the run completes with the
    structure its first start computed."""
    env, home, service_dir = stack
    structure = tmp_path / "cluster.xyz"
    structure.write_text(water_cluster_xyz(3))
    flow_run_id = _simulate(env, structure)
    _engine_of(env, home, flow_run_id)
    until = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    suspended = {
        "type": "PAUSED",
        "name": "Suspended",
        "state_details": {"pause_reschedule": True, "pause_timeout": until},
    }
    answer = api_post(env, f"/flow_runs/{flow_run_id}/set_state", {"state": suspended})
    assert answer["status"] == "ACCEPT", answer
    runs_dir = service_dir / "consumer-runs"
    assert wait_until(lambda: not any(runs_dir.iterdir()), timeout=240)
    log = (service_dir / "consumer.log").read_text()
    assert f"flow run {flow_run_id}: suspended, telling pid" in log
    state = api_get(env, f"/flow_runs/{flow_run_id}")["state"]
    assert (state["type"], state["name"]) == ("PAUSED", "Suspended"), state
    api_post(env, f"/flow_runs/{flow_run_id}/resume", {})
    state = wait_final(env, flow_run_id, timeout=120)
    assert state["type"] == "COMPLETED", state
    assert _result(home, flow_run_id)["status"] == "completed"
    assert _logged(env, flow_run_id, "1 done by an earlier attempt")


def test_a_killed_child_ends_its_run_crashed_and_its_engine_stopped(stack, tmp_path):
    env, home, service_dir = stack
    flow_run_id, engine = _running_cluster_run(env, home, tmp_path)
    consumer = _consumer(service_dir)
    child = next(p for p in engine.parents() if p.ppid() == consumer.pid)
    child.send_signal(signal.SIGKILL)
    state = wait_final(env, flow_run_id, timeout=120)
    assert state["type"] == "CRASHED", state
    assert "exited with -9" in state["message"]
    _wait_gone(engine)


def test_a_run_with_job_variables_of_its_own_is_left_to_the_worker(stack, tmp_path):
    env, _, service_dir = stack
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    job_variables = {"env": {"ATOMFORGE_PLOTS": "false"}}
    flow_run_id = _simulate(env, structure, job_variables=job_variables)
    state = wait_final(env, flow_run_id)
    assert state["type"] == "COMPLETED", state
    assert not _consumed(service_dir, flow_run_id)
    assert _forked(service_dir, flow_run_id)


def test_a_consumer_killed_mid_run_leaves_no_run_running_once_it_is_back(stack, tmp_path):
    env, home, service_dir = stack
    flow_run_id, engine = _running_cluster_run(env, home, tmp_path)
    _consumer(service_dir).send_signal(signal.SIGKILL)
    back = service(env, "up")
    assert back.returncode == 0, back.stdout + back.stderr
    state = wait_final(env, flow_run_id, timeout=120)
    assert state["type"] == "CRASHED", state
    _wait_gone(engine)
    assert (
        f"flow run {flow_run_id}: left by a consumer that stopped"
        in (service_dir / "consumer.log").read_text()
    )
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    again = _simulate(env, structure)
    assert wait_final(env, again)["type"] == "COMPLETED"
    assert _consumed(service_dir, again)
