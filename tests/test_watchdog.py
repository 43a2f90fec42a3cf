"""The watchdog: a helper command ends with its owner, also on kill -9, and passes on its
exit code and SIGTERM. Real processes."""

from __future__ import annotations

import os
import subprocess
import time

import psutil

from atomforge.flows.watchdog import watched


def _only_child(pid: int, timeout: float = 10) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while not (children := psutil.Process(pid).children()):
        assert time.monotonic() < deadline, "the watchdog started nothing"
        time.sleep(0.05)
    return children[0]


def test_the_command_dies_when_its_owner_is_killed_and_leaves_the_terminal_group():
    owner = subprocess.Popen(["sleep", "60"])
    watchdog = subprocess.Popen(watched(["sleep", "60"], owner.pid))
    try:
        command = _only_child(watchdog.pid)
        assert os.getsid(watchdog.pid) == watchdog.pid != os.getsid(0)
        owner.kill()
        assert watchdog.wait(timeout=10) == 0
        assert not command.is_running() or command.status() == psutil.STATUS_ZOMBIE
    finally:
        for process in (owner, watchdog):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_the_command_dies_with_a_killed_watchdog_and_its_exit_code_and_sigterm_pass():
    owner = os.getpid()
    assert subprocess.run(watched(["sh", "-c", "exit 3"], owner), timeout=30).returncode == 3
    trapping = watched(["sh", "-c", "trap 'kill $!; exit 7' TERM; sleep 60 & wait"], owner)
    watchdog = subprocess.Popen(trapping)
    _only_child(watchdog.pid)
    time.sleep(0.3)
    watchdog.terminate()
    assert watchdog.wait(timeout=10) == 7
    watchdog = subprocess.Popen(watched(["sleep", "60"], owner))
    command = _only_child(watchdog.pid)
    watchdog.kill()
    watchdog.wait()
    deadline = time.monotonic() + 10
    while command.is_running() and command.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the command outlived its killed watchdog"
        time.sleep(0.05)
