"""Ctrl-C and kill -9 of the ``atomforge`` command, with real processes: a screen whose
engine (a slow sh wrapper around xtb) is running gets Ctrl-C through a real terminal, or
its command gets SIGKILL; the run ends Cancelled, and nothing it started is left running.
Both ways commands run: Prefect's embedded server per command, and the local server."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import sqlite3
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from atomforge.flows.watchdog import MODULE as WATCHDOG
from tests.conftest import ATOMFORGE, REPO, run_atomforge, use_xtb_wrapper

SLOW_XTB = """#!/bin/sh
# xtb's version; a calculation writes "pid folder" to {log} and becomes a two-minute sleep
# (one process, as xtb is: a parent-death signal reaches it; children are another matter).
case "$1" in --version) exec xtb "$@" ;; esac
echo "$$ $PWD" >> {log}
exec sleep 120
"""
WATER = "3\nwater\nO 0 0 0.119262\nH 0 0.763239 -0.477047\nH 0 -0.763239 -0.477047\n"
INTERRUPTED = re.compile(r"atomforge: interrupted; run '.+' \(([0-9a-f-]{36})\) cancelled")
EXIT_SECONDS = 20.0
"""How soon the command must exit after Ctrl-C (a few seconds; a loaded 2-core machine)."""
GONE_SECONDS = 15.0
"""How soon what a killed command started must be gone."""


class Command:
    """A running ``atomforge screen`` whose terminal is a pty (stderr goes to a file)."""

    def __init__(self, env: dict[str, str], folder: Path, stderr: Path) -> None:
        self.master, slave = pty.openpty()
        self.stderr_path = stderr
        with stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [ATOMFORGE, "screen", str(folder), "--kind", "singlepoint"],
                stdin=slave,
                stdout=slave,
                stderr=err,
                env=env,
                cwd=REPO,
                start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
        os.close(slave)

    def stderr(self) -> str:
        """Return what the command wrote on standard error so far."""
        return self.stderr_path.read_text()

    def ctrl_c(self) -> None:
        """Type Ctrl-C on its terminal: SIGINT to its foreground process group."""
        os.write(self.master, b"\x03")

    def close(self) -> None:
        """Kill what is left of it and close its terminal."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def slow_xtb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make xtb slow; return the file each started calculation writes "pid folder" to."""
    log = tmp_path / "engines.log"
    use_xtb_wrapper(tmp_path / "xtb-slow", SLOW_XTB.format(log=log), monkeypatch)
    return log


def molecules(folder: Path, count: int = 3) -> Path:
    """Write ``count`` water molecules into ``folder``; return it."""
    folder.mkdir()
    for index in range(count):
        (folder / f"w{index}.xyz").write_text(WATER)
    return folder


def first_engine(log: Path, command: Command, timeout: float = 300) -> tuple[int, Path]:
    """Return the pid and folder of the first calculation the command starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().strip():
            pid, folder = log.read_text().splitlines()[0].split(" ", 1)
            return int(pid), Path(folder)
        assert command.process.poll() is None, command.stderr()
        time.sleep(0.2)
    raise AssertionError(f"no engine started: {command.stderr()}")


def engines_left(log: Path) -> list[psutil.Process]:
    """Return the live processes of every calculation's session (each runs in its own)."""
    sessions = {int(line.split()[0]) for line in log.read_text().splitlines()}
    left = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in sessions and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except (OSError, psutil.Error):
            continue
    return left


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Return those of ``processes`` that still run (not zombies)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            continue
    return running


def wait_until(check, timeout: float = GONE_SECONDS) -> bool:
    """Return whether ``check()`` came true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def embedded_servers(owner: int) -> list[psutil.Process]:
    """Return the Prefect servers that ``owner`` or its descendants started, with their
    watchdogs."""
    family = {owner} | {child.pid for child in psutil.Process(owner).children(recursive=True)}
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if WATCHDOG in cmdline and int(cmdline[cmdline.index(WATCHDOG) + 1]) in family:
            found |= {p.pid: p for p in [process, *process.children(recursive=True)]}
        elif process.pid in family and "uvicorn" in cmdline:
            found[process.pid] = process
    return list(found.values())


def prefect_servers(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Return the Prefect servers (uvicorn) among ``processes``, leaving out watchdogs."""
    return [p for p in processes if "uvicorn" in p.cmdline() and WATCHDOG not in p.cmdline()]


def run_state(env: dict[str, str], run_id: str) -> str:
    """Return the state ``run.json`` records for ``run_id``."""
    results = Path(env["ATOMFORGE_HOME"]) / "results"
    return json.loads((results / run_id / "run.json").read_text())["state"]


def embedded_prefect_state(env: dict[str, str], run_id: str) -> str:
    """Return the flow run's state in the embedded server's database (the server is gone)."""
    database = Path(env["PREFECT_HOME"]) / "prefect.db"
    with sqlite3.connect(database) as connection:
        (state,) = connection.execute(
            "select state_type from flow_run where id = ?", (run_id,)
        ).fetchone()
    return state


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment whose commands run on Prefect's embedded server."""
    env = os.environ.copy() | {
        "ATOMFORGE_HOME": str(tmp_path / "home"),
        "ATOMFORGE_LOCAL_SERVER": "false",
        "ATOMFORGE_DASK_WORKERS": "2",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="module")
def local_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Yield an environment whose commands use a local server of their own; stop it after."""
    root = tmp_path_factory.mktemp("local")
    env = os.environ.copy() | {
        "ATOMFORGE_HOME": str(root / "home"),
        "PREFECT_HOME": str(root / "prefect"),
        "ATOMFORGE_LOCAL_SERVER": "true",
        "ATOMFORGE_DASK_WORKERS": "2",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_API_URL", None)
    yield env
    run_atomforge(env, "server", "stop")


def local_prefect_state(env: dict[str, str], run_id: str) -> str:
    """Return the flow run's state as the local server's API reports it."""
    server = json.loads((Path(env["ATOMFORGE_HOME"]) / "server" / "server.json").read_text())
    return httpx.get(f"{server['api_url']}/flow_runs/{run_id}", timeout=10).json()["state_type"]


def interrupt(command: Command, log: Path) -> tuple[int, float, str]:
    """Type Ctrl-C once the first engine runs; return the exit code, the seconds the
    command took to exit, and what it wrote on stderr after the Ctrl-C."""
    first_engine(log, command)
    time.sleep(1)
    before = len(command.stderr())
    command.ctrl_c()
    began = time.monotonic()
    code = command.process.wait(timeout=120)
    return code, time.monotonic() - began, command.stderr()[before:]


def _cancelled_in_one_line(code: int, seconds: float, said: str) -> str:
    """Assert the command exited 130 in time with its one line; return the run id it names."""
    assert code == 130, said
    assert seconds < EXIT_SECONDS
    lines = said.splitlines()
    assert len(lines) == 1 and INTERRUPTED.fullmatch(lines[0]), said
    return INTERRUPTED.fullmatch(lines[0]).group(1)


@pytest.mark.parametrize("worker_processes", ["false", "true"])
def test_ctrl_c_on_an_embedded_screen_cancels_its_run_and_stops_its_server_and_engines(
    tmp_path, slow_xtb, embedded_env, worker_processes
):
    env = embedded_env | {
        "ATOMFORGE_XTB_COMMAND": os.environ["ATOMFORGE_XTB_COMMAND"],
        "ATOMFORGE_DASK_PROCESSES": worker_processes,
    }
    command = Command(env, molecules(tmp_path / "set"), tmp_path / "stderr")
    try:
        first_engine(slow_xtb, command)
        servers = embedded_servers(command.process.pid)
        assert len(prefect_servers(servers)) == 1, servers
        code, seconds, said = interrupt(command, slow_xtb)
    finally:
        command.close()
    run_id = _cancelled_in_one_line(code, seconds, said)
    assert wait_until(lambda: not engines_left(slow_xtb)), engines_left(slow_xtb)
    assert wait_until(lambda: not alive(servers)), alive(servers)
    assert run_state(env, run_id) == "Cancelled"
    assert embedded_prefect_state(env, run_id) == "CANCELLED"


def test_kill_9_of_an_embedded_screen_leaves_no_prefect_server_even_with_worker_processes(
    tmp_path, slow_xtb, embedded_env
):
    env = embedded_env | {
        "ATOMFORGE_XTB_COMMAND": os.environ["ATOMFORGE_XTB_COMMAND"],
        "ATOMFORGE_DASK_PROCESSES": "true",
    }
    command = Command(env, molecules(tmp_path / "set"), tmp_path / "stderr")
    try:
        first_engine(slow_xtb, command)
        servers = embedded_servers(command.process.pid)
        family = psutil.Process(command.process.pid).children(recursive=True)
        assert len(prefect_servers(servers)) == 1, servers
        command.process.kill()
        command.process.wait()
        assert wait_until(lambda: not alive(servers)), alive(servers)
        assert wait_until(lambda: not alive(family)), alive(family)
        assert wait_until(lambda: not engines_left(slow_xtb)), engines_left(slow_xtb)
    finally:
        command.close()


def test_ctrl_c_on_a_screen_in_the_local_server_cancels_its_run_and_stops_its_engines(
    tmp_path, slow_xtb, local_env
):
    env = local_env | {"ATOMFORGE_XTB_COMMAND": os.environ["ATOMFORGE_XTB_COMMAND"]}
    command = Command(env, molecules(tmp_path / "set"), tmp_path / "stderr")
    try:
        code, seconds, said = interrupt(command, slow_xtb)
    finally:
        command.close()
    run_id = _cancelled_in_one_line(code, seconds, said)
    assert wait_until(lambda: not engines_left(slow_xtb)), engines_left(slow_xtb)
    assert run_state(env, run_id) == "Cancelled"
    assert local_prefect_state(env, run_id) == "CANCELLED"


def command_children(env: dict[str, str]) -> list[psutil.Process]:
    """Return the local server's children that run commands (each leads its own group)."""
    server = json.loads((Path(env["ATOMFORGE_HOME"]) / "server" / "server.json").read_text())
    return [
        child
        for child in psutil.Process(server["pid"]).children()
        if os.getpgid(child.pid) == child.pid
    ]


def test_kill_9_of_a_local_server_command_cancels_its_run_and_ends_its_child(
    tmp_path, slow_xtb, local_env
):
    env = local_env | {"ATOMFORGE_XTB_COMMAND": os.environ["ATOMFORGE_XTB_COMMAND"]}
    command = Command(env, molecules(tmp_path / "set"), tmp_path / "stderr")
    try:
        _, folder = first_engine(slow_xtb, command)
        children = command_children(env)
        assert len(children) == 1, children
        command.process.kill()
        command.process.wait()
        assert wait_until(lambda: not alive(children)), alive(children)
        assert wait_until(lambda: not engines_left(slow_xtb)), engines_left(slow_xtb)
    finally:
        command.close()
    work_root = Path(env["ATOMFORGE_HOME"]) / "work"
    run_id = folder.resolve().relative_to(work_root.resolve()).parts[0]
    assert run_state(env, run_id) == "Cancelled"
    assert local_prefect_state(env, run_id) == "CANCELLED"
