"""Opt-in structured logs: with deployments/logging-json.yml every line is a JSON object
carrying the flow run, task run, structure, host and worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

SCREEN = """
import asyncio
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.screen import screen

asyncio.run(screen(StructureSource(path="examples/molecules"), make_parameters(engine="xtb")))
"""


def test_json_logs_carry_flow_run_task_run_structure_and_worker(tmp_path):
    env = os.environ | {
        "PREFECT_LOGGING_SETTINGS_PATH": str(REPO / "deployments" / "logging-json.yml"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "ATOMFORGE_FAILURE_LOG_LINES": "0",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCREEN],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert records, "the run logged something"
    about_structures = [r for r in records if r.get("structure")]
    assert about_structures, "progress lines name their structure"
    for record in about_structures:
        assert record["flow_run_id"] and record["host"] and record["worker"]
        assert record["structure"] in record["message"]
    in_tasks = [r for r in records if r.get("task_run_id")]
    assert in_tasks and all(r["flow_run_id"] for r in in_tasks)
    assert any(r["name"] == "prefect.task_runs" for r in in_tasks)
