"""The scheduled inbox deployment on a real `prefect server`: its schedule starts off, a
redeploy keeps the state someone gave it, and a run reads the inbox from the environment."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import WATER_XYZ
from tests.prefect_server import prefect_cli, server_env, start_server, start_worker, stop

pytestmark = pytest.mark.e2e
DEPLOYMENT = "screen-inbox/screen-nightly"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Start a Prefect server on loopback with the process pool; return (env, api, home)."""
    home = tmp_path_factory.mktemp("inbox-e2e")
    env = server_env(home, ATOMFORGE_INBOX_DIR=str(home / "inbox"))
    proc = start_server(env, home / "server.log")
    try:
        prefect_cli(env, "work-pool", "create", "atomforge-process", "--type", "process")
        yield env, env["PREFECT_API_URL"], home
    finally:
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def deployed(server):
    """Deploy screen-nightly once (its first deploy); return what ``server`` returns."""
    _deploy(server[0])
    return server


def _deploy(env: dict) -> None:
    prefect_cli(env, "--no-prompt", "deploy", "--name", "screen-nightly")


def _schedules(api: str) -> list[dict]:
    deployment = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=10).json()
    return deployment["schedules"]


def _wait_final(api: str, flow_run_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()["state"]
        if state and state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return state
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish")


def test_the_nightly_schedule_starts_off_and_a_redeploy_keeps_its_state(deployed):
    env, api, _ = deployed
    [schedule] = _schedules(api)
    assert (schedule["slug"], schedule["active"]) == ("nightly", False)
    assert schedule["schedule"]["cron"] == "0 2 * * *"

    prefect_cli(env, "deployment", "schedule", "resume", DEPLOYMENT, schedule["id"])
    assert _schedules(api)[0]["active"] is True
    _deploy(env)
    assert [(s["id"], s["active"]) for s in _schedules(api)] == [(schedule["id"], True)]

    prefect_cli(env, "deployment", "schedule", "pause", DEPLOYMENT, schedule["id"])
    _deploy(env)
    assert [(s["id"], s["active"]) for s in _schedules(api)] == [(schedule["id"], False)]


def test_a_nightly_run_screens_the_inbox_the_environment_names(deployed):
    env, api, home = deployed
    inbox = Path(env["ATOMFORGE_INBOX_DIR"])
    assert not inbox.exists()
    worker = start_worker(env, home / "worker.log")
    try:
        empty = _run(env, api)
        assert empty["type"] == "COMPLETED", empty
        assert empty["message"].startswith("no files waiting")
        (inbox / "water.xyz").write_text(WATER_XYZ)
        state = _run(env, api)
    finally:
        stop(worker)
    assert state["type"] == "COMPLETED", (state, (home / "worker.log").read_text()[-3000:])
    sidecar = json.loads((inbox / "done" / "water.xyz.result.json").read_text())
    assert sidecar["status"] == "done"
    [result] = sidecar["results"]
    flow_run_id, result_id = result["id"].split("/")
    document = json.loads(
        (home / "atomforge" / "results" / flow_run_id / f"{result_id}.json").read_text()
    )
    assert document["status"] == "completed"
    assert not [p for p in (inbox / "processing").iterdir() if not p.name.startswith(".")]


def _run(env: dict, api: str) -> dict:
    out = prefect_cli(env, "deployment", "run", DEPLOYMENT)
    return _wait_final(api, re.search(r"UUID: ([0-9a-f-]{36})", out).group(1))
