"""The host's cores limit: run-engine tasks of all runs on a host hold at most its cores,
a process killed with kill -9 gives its cores back at once, and a task asking for more
cores than the host has takes them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from atomforge.flows.scheduling import cores
from atomforge.flows.scheduling.cores import hold_cores, host_cores

HOLD_ALL = """
import sys, time
from pathlib import Path
from atomforge.flows.scheduling.cores import hold_cores
with hold_cores("test", 10_000, Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(lock_dir: Path) -> subprocess.Popen:
    """Start a process that holds every core of the limit ``test``; return it once it does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_ALL, str(lock_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def _acquired_within(lock_dir: Path, seconds: float, cores: int = 1) -> bool:
    """Return whether this process gets ``cores`` of the limit ``test`` within ``seconds``
    (it keeps waiting in a daemon thread otherwise, and lets them go once it has them)."""
    got = threading.Event()

    def take() -> None:
        with hold_cores("test", cores, lock_dir):
            got.set()

    threading.Thread(target=take, daemon=True).start()
    return got.wait(seconds)


def test_a_task_waits_while_another_process_holds_every_core(tmp_path):
    holder = _holder(tmp_path)
    try:
        assert not _acquired_within(tmp_path, 1.0)
    finally:
        holder.terminate()
        holder.wait()
    assert _acquired_within(tmp_path, 5.0)


def test_a_process_killed_with_kill_9_gives_its_cores_back_at_once(tmp_path):
    holder = _holder(tmp_path)
    holder.kill()
    holder.wait()
    assert _acquired_within(tmp_path, 1.0)


def test_threads_of_one_process_count_against_each_other(tmp_path):
    with hold_cores("test", host_cores(), tmp_path) as held:
        assert held == host_cores()
        assert not _acquired_within(tmp_path, 0.5)


def test_more_cores_than_the_host_has_takes_them_all_and_leaves_none(tmp_path):
    with hold_cores("test", host_cores() + 3, tmp_path) as held:
        assert held == host_cores()
        assert not _acquired_within(tmp_path, 0.5)
    assert _acquired_within(tmp_path, 1.0, cores=host_cores())


def test_cores_a_parent_lets_go_are_free_while_a_child_it_forked_lives_on(tmp_path):
    with hold_cores("test", host_cores(), tmp_path):
        child = os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
    try:
        assert _acquired_within(tmp_path, 1.0, cores=host_cores())
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_cores_are_counted_one_by_one_up_to_the_hosts(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "host_cores", lambda: 4)
    with hold_cores("test", 3, tmp_path) as held:
        assert held == 3
        with hold_cores("test", 1, tmp_path):
            assert not _acquired_within(tmp_path, 0.5)
    assert _acquired_within(tmp_path, 1.0, cores=4)


def test_a_task_waiting_for_many_cores_is_not_overtaken_by_one_core_tasks(tmp_path, monkeypatch):
    """Once a two-core task waits behind a held core, a one-core task that comes later
    waits behind it, though a core is free."""
    monkeypatch.setattr(cores, "host_cores", lambda: 2)
    order: list[str] = []
    with hold_cores("test", 1, tmp_path):
        big = threading.Thread(target=_take, args=(tmp_path, 2, "big", order), daemon=True)
        big.start()
        time.sleep(0.3)
        small = threading.Thread(target=_take, args=(tmp_path, 1, "small", order), daemon=True)
        small.start()
        time.sleep(0.3)
        assert order == []
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]


def _take(lock_dir: Path, n: int, name: str, order: list[str]) -> None:
    with hold_cores("test", n, lock_dir):
        order.append(name)
        time.sleep(0.1)
