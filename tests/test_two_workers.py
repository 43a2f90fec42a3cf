"""Two Prefect process workers on one pool, sharing one work root, take runs at once."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from tests.conftest import REPO
from tests.prefect_server import (
    prefect_cli,
    run_deployment_cli,
    server_env,
    start_server,
    start_worker,
    stop,
    wait_final,
)

pytestmark = pytest.mark.e2e


def test_two_workers_share_a_work_root_and_lose_or_repeat_nothing(tmp_path):
    env = server_env(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    server = start_server(env, logs / "server.log")
    workers = []
    try:
        prefect_cli(env, "work-pool", "create", "atomforge-process", "--type", "process")
        prefect_cli(env, "--no-prompt", "deploy", "--name", "screen")
        for name in ("first", "second"):
            workers.append(start_worker(env, logs / f"{name}.log", "--name", name, "--limit", "2"))
        molecules = REPO / "examples" / "molecules"
        runs = [
            run_deployment_cli(
                env,
                "screen/screen",
                source={"path": str(molecules)},
                parameters={"engine": "xtb", "kind": "singlepoint"},
            )
            for _ in range(4)
        ]
        for flow_run_id in runs:
            assert wait_final(env, flow_run_id)["type"] == "COMPLETED"
    finally:
        for worker in workers:
            stop(worker)
        stop(server)
    taken = {
        name: [run for run in runs if f"flow-run/{run}" in (logs / f"{name}.log").read_text()]
        for name in ("first", "second")
    }
    assert all(taken.values()), f"each worker takes runs: {taken}"
    assert sorted(taken["first"] + taken["second"]) == sorted(runs), "each run ran once"
    results = tmp_path / "atomforge" / "results"
    n_molecules = len(list(molecules.glob("*.xyz")))
    for flow_run_id in runs:
        documents = [
            json.loads(path.read_text()) for path in (results / flow_run_id).glob("0*.json")
        ]
        assert Counter(d["status"] for d in documents) == {"completed": n_molecules}
        assert len({d["id"] for d in documents}) == n_molecules
    work_dirs = [path for path in (tmp_path / "atomforge" / "work").iterdir() if path.is_dir()]
    claims = Counter(claim.read_text() for run in work_dirs for claim in run.glob("*/claim"))
    assert sum(claims.values()) == 4 * n_molecules, "every structure claimed by one task"
    shutil.rmtree(tmp_path / "prefect", ignore_errors=True)
