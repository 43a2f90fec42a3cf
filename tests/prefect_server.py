"""A real `prefect server` on loopback for end-to-end tests: start, wait, CLI, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    """Return a TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """Return the environment of a server, workers and CLI calls kept under ``home``."""
    env = os.environ.copy() | {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "ATOMFORGE_HOME": str(home / "atomforge"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PWD": str(REPO),
        **extra,
    }
    env.pop("PREFECT_API_KEY", None)
    return env


def start_server(env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `prefect server start` at ``env``'s API address; return it once it is healthy."""
    api = env["PREFECT_API_URL"]
    port = api.split(":")[2].split("/")[0]
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
        env=env | {"PREFECT_API_URL": ""},
        cwd=log.parent,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(log.read_text()[-3000:])
        time.sleep(0.5)


def start_worker(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """Start a process worker on the atomforge-process pool, in the repository, with more
    `prefect worker start` arguments ``args``; return it."""
    return subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "atomforge-process", *args],
        env=env,
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen | None) -> None:
    """Stop ``proc``'s whole process group: SIGTERM, then SIGKILL after 30 s."""
    if proc is None:
        return
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def prefect_cli(env: dict[str, str], *args: str) -> str:
    """Run the `prefect` command with ``args`` from the repository; return its output."""
    out = subprocess.run(
        [PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout
