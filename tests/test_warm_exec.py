"""The warm executor for real: the service's worker runs deployment runs in children forked
from it, a cancel or a killed client stops them and their engines, and a run it cannot
take starts its own engine."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import WATER_XYZ, water_cluster_xyz, xtb_process
from tests.prefect_server import (
    api_get,
    create_deployment_run,
    prefect_cli,
    run_deployment_cli,
    running_service,
    wait_final,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack():
    """The service without its consumer (the worker starts every run); yield (client
    environment, atomforge home, service folder)."""
    with running_service(consumer="false") as (env, folder):
        yield env, Path(env["ATOMFORGE_HOME"]), folder / "service"


def _executor(service: Path) -> psutil.Process:
    return psutil.Process(int((service / "warm.pid").read_text()))


def _forked(service: Path, flow_run_id: str) -> bool:
    return f"flow run {flow_run_id}: pid " in (service / "warm.log").read_text()


def _result(home: Path, flow_run_id: str) -> dict:
    (document,) = (home / "results" / flow_run_id).glob("00000-*.json")
    return json.loads(document.read_text())


def _simulate(env: dict[str, str], structure: Path, engine: str = "xtb", **body) -> str:
    parameters = {"source": {"path": str(structure)}, "parameters": {"engine": engine}}
    return create_deployment_run(env, "simulate/simulate", parameters=parameters, **body)


def _engine_of(env: dict[str, str], home: Path, flow_run_id: str) -> psutil.Process:
    """Return the xtb process of a running flow run, once it has one."""
    pid_dir = home / "work" / ".control" / flow_run_id / "pids"
    deadline = time.monotonic() + 180
    while not list(pid_dir.glob("*.json")):
        assert time.monotonic() < deadline, api_get(env, f"/flow_runs/{flow_run_id}")["state"]
        time.sleep(0.2)
    return xtb_process(json.loads(next(pid_dir.glob("*.json")).read_text())["pid"])


def _wait_gone(process: psutil.Process, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"{process} still running"
        time.sleep(0.2)


def test_a_deployment_run_runs_in_a_child_of_the_warm_executor(stack, tmp_path):
    env, home, service = stack
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    flow_run_id = run_deployment_cli(
        env, "simulate/simulate", source={"path": str(structure)}, parameters={"engine": "xtb"}
    )
    state = wait_final(env, flow_run_id)
    assert state["type"] == "COMPLETED", state
    assert _forked(service, flow_run_id)
    assert _result(home, flow_run_id)["energy_hartree"] == pytest.approx(-5.070544, abs=2e-6)


def test_cancelling_a_warm_run_stops_it_and_its_engine(stack, tmp_path):
    env, home, service = stack
    structure = tmp_path / "cluster.xyz"
    structure.write_text(water_cluster_xyz(4))
    flow_run_id = _simulate(env, structure)
    engine = _engine_of(env, home, flow_run_id)
    assert _executor(service).pid in [p.pid for p in engine.parents()]
    prefect_cli(env, "flow-run", "cancel", flow_run_id)
    state = wait_final(env, flow_run_id, timeout=120)
    assert state["type"] == "CANCELLED", state
    _wait_gone(engine)


def test_killing_the_client_stops_its_run_and_engine(stack, tmp_path):
    env, home, service = stack
    structure = tmp_path / "cluster.xyz"
    structure.write_text(water_cluster_xyz(4))
    flow_run_id = _simulate(env, structure)
    engine = _engine_of(env, home, flow_run_id)
    client = psutil.Process(int(api_get(env, f"/flow_runs/{flow_run_id}")["infrastructure_pid"]))
    assert "warm_client.py" in " ".join(client.cmdline())
    child = next(p for p in engine.parents() if p.ppid() == _executor(service).pid)
    os.kill(client.pid, signal.SIGKILL)
    state = wait_final(env, flow_run_id, timeout=120)
    assert state["type"] == "CRASHED", state
    _wait_gone(engine)
    _wait_gone(child)


def test_a_run_with_other_prefect_settings_starts_its_own_engine(stack, tmp_path):
    env, home, service = stack
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    job_variables = {"env": {"PREFECT_LOGGING_LOG_PRINTS": "true"}}
    flow_run_id = _simulate(env, structure, job_variables=job_variables)
    state = wait_final(env, flow_run_id)
    assert state["type"] == "COMPLETED", state
    assert not _forked(service, flow_run_id)
    assert (
        "other Prefect settings: PREFECT_LOGGING_LOG_PRINTS" in (service / "warm.log").read_text()
    )
    assert _result(home, flow_run_id)["energy_hartree"] == pytest.approx(-5.070544, abs=2e-6)


def test_a_run_starts_its_own_engine_when_the_warm_executor_is_down(stack, tmp_path):
    env, home, service = stack
    executor = _executor(service)
    executor.terminate()
    executor.wait(timeout=30)
    assert not (service / "warm.sock").exists()
    structure = tmp_path / "water.xyz"
    structure.write_text(WATER_XYZ)
    flow_run_id = _simulate(env, structure)
    state = wait_final(env, flow_run_id)
    assert state["type"] == "COMPLETED", state
    assert not _forked(service, flow_run_id)
    assert _result(home, flow_run_id)["energy_hartree"] == pytest.approx(-5.070544, abs=2e-6)
