"""End to end: a real `prefect server`, a process worker, `prefect deploy` and `deployment run`."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import WATER_XYZ, water_cluster_xyz
from tests.prefect_server import prefect_cli, server_env, start_server, start_worker, stop

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Start a Prefect server and a worker on loopback; return (env, api_url, atomforge_home)."""
    home = tmp_path_factory.mktemp("e2e")
    env = server_env(home)
    logs = home / "logs"
    logs.mkdir()
    server = start_server(env, logs / "server.log")
    worker = None
    try:
        prefect_cli(env, "work-pool", "create", "atomforge-process", "--type", "process")
        prefect_cli(env, "--no-prompt", "deploy", "--all")
        worker = start_worker(env, logs / "worker.log")
        yield env, env["PREFECT_API_URL"], Path(env["ATOMFORGE_HOME"])
    finally:
        stop(worker)
        stop(server)
        shutil.rmtree(home, ignore_errors=True)


def _run_deployment(env: dict, name: str, **params) -> str:
    args = ["deployment", "run", name]
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    out = prefect_cli(env, *args)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def _state(api: str, flow_run_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()["state"]


def _wait_final(api: str, flow_run_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(api, flow_run_id)
        if state and state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return state
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish: {_state(api, flow_run_id)}")


def test_deployment_run_computes_water_on_a_worker(stack, tmp_path):
    env, api, home = stack
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    flow_run_id = _run_deployment(
        env,
        "simulate/simulate",
        source={"path": str(structure)},
        parameters={"engine": "xtb"},
    )
    state = _wait_final(api, flow_run_id)
    assert state["type"] == "COMPLETED", state
    documents = list((home / "results" / flow_run_id).glob("00000-*.json"))
    result = json.loads(documents[0].read_text())
    assert result["energy_hartree"] == pytest.approx(-5.070544, abs=2e-6)


def test_cancelling_a_deployment_run_stops_its_engine(stack, tmp_path):
    env, api, home = stack
    structure = tmp_path / "cluster.xyz"
    structure.write_text(water_cluster_xyz(4))
    flow_run_id = _run_deployment(
        env,
        "simulate/simulate",
        source={"path": str(structure)},
        parameters={"engine": "xtb"},
    )
    pid_dir = home / "work" / ".control" / flow_run_id / "pids"
    deadline = time.monotonic() + 180
    while not list(pid_dir.glob("*.json")):
        assert time.monotonic() < deadline, _state(api, flow_run_id)
        time.sleep(0.5)
    pid = json.loads(next(pid_dir.glob("*.json")).read_text())["pid"]
    assert "xtb" in psutil.Process(pid).name()
    prefect_cli(env, "flow-run", "cancel", flow_run_id)
    state = _wait_final(api, flow_run_id, timeout=120)
    assert state["type"] == "CANCELLED", state
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "xtb still running after cancellation"
        time.sleep(0.2)


def test_workflow_step_runs_as_a_run_of_its_deployment(stack, tmp_path):
    env, api, home = stack
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
    flow_run_id = _run_deployment(env, "workflow/workflow", spec=spec)
    state = _wait_final(api, flow_run_id, timeout=300)
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
    step_run = httpx.get(f"{api}/flow_runs/{remote['flow_run_id']}", timeout=10).json()
    assert step_run["deployment_id"] is not None
    assert step_run["parent_task_run_id"] is not None
    pre_run = httpx.get(f"{api}/flow_runs/{pre['flow_run_id']}", timeout=10).json()
    assert pre_run["deployment_id"] is None
