"""A real `prefect server` on loopback for end-to-end tests: start, wait, CLI, stop; or the
whole service (PostgreSQL, server with auth, pool, worker) by its own command."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def _auth(env: dict[str, str]) -> tuple[str, str] | None:
    """Return the basic auth of ``env``'s API, if it has one."""
    auth = env.get("PREFECT_API_AUTH_STRING")
    return tuple(auth.split(":", 1)) if auth else None


def api_get(env: dict[str, str], path: str) -> dict:
    """Return the JSON the API of ``env`` answers to GET ``path`` (with its auth)."""
    response = httpx.get(f"{env['PREFECT_API_URL']}{path}", auth=_auth(env), timeout=10)
    response.raise_for_status()
    return response.json()


def api_post(env: dict[str, str], path: str, body: dict) -> dict:
    """Return the JSON the API of ``env`` answers to POST ``path`` with ``body`` (with its
    auth, and the CSRF token a service's server asks for)."""
    with httpx.Client(base_url=env["PREFECT_API_URL"], auth=_auth(env), timeout=10) as client:
        csrf = client.get("/csrf-token", params={"client": "tests"})
        if csrf.status_code == 200:
            token = csrf.json()["token"]
            client.headers.update({"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "tests"})
        response = client.post(path, json=body)
        response.raise_for_status()
        return response.json()


def create_deployment_run(env: dict[str, str], name: str, **body) -> str:
    """Create a run of deployment ``name`` through the API, as ``run_deployment`` does (the
    ``create_flow_run`` body: parameters, job_variables, ...); return the flow run id."""
    deployment = api_get(env, f"/deployments/name/{name}")
    return api_post(env, f"/deployments/{deployment['id']}/create_flow_run", body)["id"]


def run_deployment_cli(env: dict[str, str], name: str, **params) -> str:
    """Start deployment ``name`` with `prefect deployment run`; return the flow run id."""
    args = ["deployment", "run", name]
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    out = prefect_cli(env, *args)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def wait_final(env: dict[str, str], flow_run_id: str, timeout: float = 240) -> dict:
    """Return the final state of a flow run once it has one (AssertionError after timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = api_get(env, f"/flow_runs/{flow_run_id}")["state"]
        if state and state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return state
        time.sleep(1)
    state = api_get(env, f"/flow_runs/{flow_run_id}")["state"]
    raise AssertionError(f"flow run {flow_run_id} did not finish: {state}")


def service(env: dict[str, str], action: str) -> subprocess.CompletedProcess:
    """Run the service command (``atomforge.deployments.service``) with ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "atomforge.deployments.service", action],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def service_folder(**settings: str) -> tuple[Path, dict[str, str]]:
    """Return a new folder (readable by PostgreSQL's user) for a service and the
    environment that puts it there on free ports, with more ``ATOMFORGE_SERVICE_*``
    ``settings``."""
    folder = Path(tempfile.mkdtemp(prefix="atomforge-service-"))
    folder.chmod(0o755)
    env = os.environ | {
        "ATOMFORGE_SERVICE_DIR": str(folder / "service"),
        "ATOMFORGE_SERVICE_PORT": str(free_port()),
        "ATOMFORGE_SERVICE_POSTGRES_PORT": str(free_port()),
        "ATOMFORGE_SERVICE_WORKER_HEALTH_PORT": str(free_port()),
        "ATOMFORGE_HOME": str(folder / "atomforge"),
        "PREFECT_HOME": str(folder / "prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PWD": str(REPO),
        **{f"ATOMFORGE_SERVICE_{key.upper()}": value for key, value in settings.items()},
    }
    env.pop("PREFECT_API_URL", None)
    return folder, env


@contextmanager
def running_service(**settings: str) -> Iterator[tuple[dict[str, str], Path]]:
    """Bring the service (PostgreSQL, server with auth, pool, worker) up in a folder of its
    own on free ports, with more ``ATOMFORGE_SERVICE_*`` ``settings``; yield the client
    environment and the folder; bring it down and remove the folder."""
    folder, env = service_folder(**settings)
    started = service(env, "up")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        for line in service(env, "env").stdout.splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = value.strip("'")
        yield env, folder
    finally:
        service(env, "down")
        shutil.rmtree(folder, ignore_errors=True)
