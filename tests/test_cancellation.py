"""Stopping a run stops its engine: the whole process tree, whichever way the run ends."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil

from atomforge.flows.settings import get_settings
from tests.conftest import (
    start_simulate_process,
    use_xtb_wrapper,
    water_cluster_xyz,
    xtb_process,
)


def _wait_for_engine(control_root: Path, timeout: float = 90) -> dict:
    """Return the first engine pid record that appears under the control root."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in control_root.glob("*/pids/*.json"):
            try:
                return json.loads(record.read_text()) | {"flow_run_id": record.parts[-3]}
            except ValueError:
                continue
        time.sleep(0.2)
    raise AssertionError("no engine process started")


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_to_the_flow_kills_the_engine_tree_and_marks_the_run_crashed(tmp_path):
    structure = tmp_path / "cluster.xyz"
    structure.write_text(water_cluster_xyz(4))
    flow_proc = start_simulate_process(tmp_path, structure, engine="xtb")
    try:
        control_root = get_settings().resolved_work_root() / ".control"
        record = _wait_for_engine(control_root)
        xtb_process(record["pid"])
        time.sleep(1)
        flow_proc.send_signal(signal.SIGTERM)
        flow_proc.wait(timeout=60)
        assert _gone(record["pid"])
        session = [p for p in psutil.process_iter() if _sid(p.pid) == record["pid"]]
        assert session == []
        assert (control_root / record["flow_run_id"] / "stop").exists()
    finally:
        if flow_proc.poll() is None:
            flow_proc.kill()
    from prefect import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(record["flow_run_id"]).state
    assert state.is_crashed()
    from atomforge.flows.store.files import load_run

    run = load_run(get_settings().resolved_results_root(), record["flow_run_id"])
    assert run.state == "Crashed"


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_a_killed_flow_process_takes_its_engines_with_it(tmp_path):
    structure = tmp_path / "cluster.xyz"
    structure.write_text(water_cluster_xyz(4))
    flow_proc = start_simulate_process(tmp_path, structure, engine="xtb")
    try:
        control_root = get_settings().resolved_work_root() / ".control"
        record = _wait_for_engine(control_root)
        xtb_process(record["pid"])
        flow_proc.send_signal(signal.SIGKILL)
        flow_proc.wait(timeout=30)
        assert _gone(record["pid"], timeout=10), "the engine outlived its flow's process"
    finally:
        if flow_proc.poll() is None:
            flow_proc.kill()


WRAPPER_WITH_A_CHILD = """#!/bin/sh
if [ "$1" = "--version" ]; then exec xtb --version; fi
sleep 300 &
echo $! > {pid_file}
wait
"""


def test_a_killed_flow_process_takes_what_its_engine_started_with_it(tmp_path, monkeypatch):
    """A wrapper script that runs its program without exec: the parent-death signal stops
    the script only; the reaper kills the rest of its session."""
    grandchild = tmp_path / "grandchild.pid"
    use_xtb_wrapper(tmp_path / "xtb", WRAPPER_WITH_A_CHILD.format(pid_file=grandchild), monkeypatch)
    structure = tmp_path / "water.xyz"
    structure.write_text(water_cluster_xyz(1))
    flow_proc = start_simulate_process(tmp_path, structure, engine="xtb")
    try:
        deadline = time.monotonic() + 90
        while not grandchild.exists() or not grandchild.read_text().strip():
            assert time.monotonic() < deadline and flow_proc.poll() is None, "no engine started"
            time.sleep(0.1)
        pid = int(grandchild.read_text())
        assert psutil.pid_exists(pid)
        flow_proc.send_signal(signal.SIGKILL)
        flow_proc.wait(timeout=30)
        assert _gone(pid, timeout=10), "the wrapper's program outlived its flow's process"
    finally:
        if flow_proc.poll() is None:
            flow_proc.kill()
