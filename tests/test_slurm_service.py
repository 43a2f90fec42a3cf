"""The README's "On a cluster" commands, run against the local SLURM: the `atomforge` command
and a Prefect worker on the login node, engines in SLURM jobs, cancel from Prefect."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ATOMFORGE, REPO, water_cluster_xyz
from tests.prefect_server import (
    prefect_cli,
    run_deployment_cli,
    server_env,
    start_server,
    start_worker,
    stop,
    wait_final,
)
from tests.test_slurm import (
    SLURM_SETTINGS,
    _squeue,
    _wait_for_engines_in_jobs,
    _wait_until_no_jobs,
    slurm,  # noqa: F401 (the local SLURM fixture)
)

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def login_node(slurm, tmp_path_factory):  # noqa: F811
    """A Prefect server, the deployments, and a worker whose runs put engines in SLURM jobs."""
    home = tmp_path_factory.mktemp("login")
    env = server_env(home, **SLURM_SETTINGS)
    logs = home / "logs"
    logs.mkdir()
    server = start_server(env, logs / "server.log")
    worker = None
    try:
        prefect_cli(env, "work-pool", "create", "atomforge-process", "--type", "process")
        prefect_cli(env, "--no-prompt", "deploy", "--all")
        worker = start_worker(env, logs / "worker.log")
        yield env, Path(env["ATOMFORGE_HOME"])
    finally:
        stop(worker)
        stop(server)
        _wait_until_no_jobs(timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def test_the_atomforge_command_runs_a_workflow_with_engines_in_slurm_jobs(login_node):
    env, home = login_node
    spec = REPO / "examples" / "workflows" / "molecules.yaml"
    done = subprocess.run(
        [ATOMFORGE, "workflow", str(spec), "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    statuses = [json.loads(path.read_text()) for path in (home / "work").glob("*/*/status.json")]
    assert len(statuses) >= 6 + 3 + 1
    assert all(status["batch_job"] for status in statuses), "every engine ran in a SLURM job"
    _wait_until_no_jobs(timeout=30)


def test_a_deployment_run_on_slurm_completes_and_a_cancelled_one_leaves_no_job(
    login_node, tmp_path
):
    env, home = login_node
    molecules = REPO / "examples" / "molecules"
    flow_run_id = run_deployment_cli(
        env,
        "screen/screen",
        source={"path": str(molecules)},
        parameters={"engine": "xtb", "kind": "singlepoint"},
    )
    assert wait_final(env, flow_run_id)["type"] == "COMPLETED"
    run = json.loads((home / "results" / flow_run_id / "run.json").read_text())
    assert run["n_completed"] == len(list(molecules.glob("*.xyz")))
    _wait_until_no_jobs(timeout=30)

    clusters = tmp_path / "clusters"
    clusters.mkdir()
    for i in range(2):
        (clusters / f"cluster{i}.xyz").write_text(water_cluster_xyz(3))
    flow_run_id = run_deployment_cli(
        env,
        "screen/screen",
        source={"path": str(clusters)},
        parameters={"engine": "xtb", "kind": "optimize"},
    )
    engines = _wait_for_engines_in_jobs()
    assert _squeue(), "the run's jobs are in the queue"
    prefect_cli(env, "flow-run", "cancel", flow_run_id)
    assert wait_final(env, flow_run_id, timeout=120)["type"] == "CANCELLED"
    _wait_until_no_jobs(timeout=30)
    deadline = time.monotonic() + 30
    while any(engine.is_running() and engine.status() != "zombie" for engine in engines):
        assert time.monotonic() < deadline, "an engine outlived its cancelled SLURM job"
        time.sleep(0.2)
