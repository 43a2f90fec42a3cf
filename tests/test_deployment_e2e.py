"""End to end: a real `prefect server`, a process worker, `prefect deploy` and `deployment run`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import WATER_XYZ, water_cluster_xyz, xtb_process
from tests.prefect_server import (
    api_get,
    prefect_cli,
    run_deployment_cli,
    running_service,
    wait_final,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack():
    """Bring the service up (PostgreSQL, Prefect server with auth, pool, deployments,
    worker) by its own command; return (client environment, atomforge home)."""
    with running_service() as (env, _):
        yield env, Path(env["ATOMFORGE_HOME"])


def test_deployment_run_computes_water_on_a_worker(stack, tmp_path):
    env, home = stack
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    flow_run_id = run_deployment_cli(
        env,
        "simulate/simulate",
        source={"path": str(structure)},
        parameters={"engine": "xtb"},
    )
    state = wait_final(env, flow_run_id)
    assert state["type"] == "COMPLETED", state
    documents = list((home / "results" / flow_run_id).glob("00000-*.json"))
    result = json.loads(documents[0].read_text())
    assert result["energy_hartree"] == pytest.approx(-5.070544, abs=2e-6)


def test_cancelling_a_deployment_run_stops_its_engine(stack, tmp_path):
    env, home = stack
    structure = tmp_path / "cluster.xyz"
    structure.write_text(water_cluster_xyz(4))
    flow_run_id = run_deployment_cli(
        env,
        "simulate/simulate",
        source={"path": str(structure)},
        parameters={"engine": "xtb"},
    )
    pid_dir = home / "work" / ".control" / flow_run_id / "pids"
    deadline = time.monotonic() + 180
    while not list(pid_dir.glob("*.json")):
        assert time.monotonic() < deadline, api_get(env, f"/flow_runs/{flow_run_id}")["state"]
        time.sleep(0.5)
    pid = json.loads(next(pid_dir.glob("*.json")).read_text())["pid"]
    xtb_process(pid)
    prefect_cli(env, "flow-run", "cancel", flow_run_id)
    state = wait_final(env, flow_run_id, timeout=120)
    assert state["type"] == "CANCELLED", state
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "xtb still running after cancellation"
        time.sleep(0.2)


def test_workflow_step_runs_as_a_run_of_its_deployment(stack, tmp_path):
    env, home = stack
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    spec = {
        "source": {"path": str(structure)},
        "steps": [
            {
                "name": "pre",
                "engine": "xtb",
                "kind": "singlepoint",
                "options": {"method": "GFN1-xTB"},
            },
            {"name": "remote", "engine": "xtb", "deployment": "workflow-step/workflow-step"},
        ],
    }
    flow_run_id = run_deployment_cli(env, "workflow/workflow", spec=spec)
    state = wait_final(env, flow_run_id, timeout=300)
    assert state["type"] == "COMPLETED", state
    documents = [json.loads(path.read_text()) for path in (home / "results").glob("*/0*.json")]
    (remote,) = [
        d for d in documents if d.get("workflow_run_id") == flow_run_id and d["step"] == "remote"
    ]
    (pre,) = [
        d for d in documents if d.get("workflow_run_id") == flow_run_id and d["step"] == "pre"
    ]
    assert remote["parent_id"] == f"{pre['flow_run_id']}/{pre['id']}"
    assert remote["energy_hartree"] == pytest.approx(-5.070544, abs=2e-6)
    step_run = api_get(env, f"/flow_runs/{remote['flow_run_id']}")
    assert step_run["deployment_id"] is not None
    assert step_run["parent_task_run_id"] is not None
    pre_run = api_get(env, f"/flow_runs/{pre['flow_run_id']}")
    assert pre_run["deployment_id"] is None


def test_a_deployment_parameter_cannot_read_a_system_file(stack):
    env, _ = stack
    flow_run_id = run_deployment_cli(
        env,
        "simulate/simulate",
        source={"path": "/etc/shadow", "format": "xyz"},
        parameters={"engine": "xtb"},
    )
    state = wait_final(env, flow_run_id)
    assert state["type"] == "FAILED", state
    assert "outside the folders runs may read" in state["message"], state["message"]
    assert "root:" not in json.dumps(api_get(env, f"/flow_runs/{flow_run_id}"))


def _engines_under(home: Path, name: str) -> list[psutil.Process]:
    """Return the ``name`` processes working under ``home`` (not those of other runs)."""
    found = []
    for process in psutil.process_iter(["name", "cwd"]):
        cwd = process.info["cwd"]
        if process.info["name"] == name and cwd and Path(cwd).is_relative_to(home):
            found.append(process)
    return found


def test_concurrent_runs_share_the_machine_without_oversubscribing_it(stack, tmp_path):
    env, home = stack
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    for i in range(8):
        (clusters / f"cluster{i}.xyz").write_text(water_cluster_xyz(2, spacing=3.1 + 0.05 * i))
    runs = [
        run_deployment_cli(
            env,
            "screen/screen",
            source={"path": str(clusters)},
            parameters={"engine": "xtb", "kind": "optimize"},
        )
        for _ in range(2)
    ]
    most = 0
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        states = [api_get(env, f"/flow_runs/{run}")["state"]["type"] for run in runs]
        most = max(most, len(_engines_under(home, "xtb")))
        if all(state in {"COMPLETED", "FAILED", "CRASHED"} for state in states):
            break
        time.sleep(0.1)
    assert states == ["COMPLETED", "COMPLETED"], states
    spans = [api_get(env, f"/flow_runs/{run}") for run in runs]
    overlap = max(s["start_time"] for s in spans) < min(s["end_time"] for s in spans)
    assert overlap, "the two runs ran at the same time"
    assert 1 <= most <= (os.cpu_count() or 1), f"{most} xtb processes at once"
