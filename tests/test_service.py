"""The service command for real: PostgreSQL, the Prefect server on it with auth, the pool
with its priority queues, a worker with its health check; up, status, down."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from tests.conftest import WATER_XYZ, water_cluster_xyz
from tests.prefect_server import create_deployment_run, running_service, service

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def one_slot_service():
    """The service with one flow run at a time; yield (client environment, folder)."""
    with running_service(worker_limit="1") as started:
        yield started


def test_status_reports_every_part_up(one_slot_service):
    env, _ = one_slot_service
    status = service(env, "status")
    assert status.returncode == 0, status.stdout
    lines = status.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["postgres", "up"],
        ["server", "up"],
        ["pool", "up"],
        ["worker", "up"],
    ]
    assert "urgent (1), default (2), batch (3)" in lines[2]


def test_the_server_refuses_unauthenticated_requests_and_listens_on_loopback(one_slot_service):
    env, folder = one_slot_service
    api = env["PREFECT_API_URL"]
    assert httpx.get(f"{api}/admin/version", timeout=10).status_code == 401
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code in {401, 403}
    auth = tuple(env["PREFECT_API_AUTH_STRING"].split(":", 1))
    assert httpx.get(f"{api}/admin/version", auth=auth, timeout=10).status_code == 200
    server = psutil.Process(int((folder / "service" / "server.pid").read_text()))
    port = int(env["ATOMFORGE_SERVICE_PORT"])
    listening = [
        c.laddr
        for p in [server, *server.children(recursive=True)]
        for c in p.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)
    password = (folder / "service" / "postgres-password").read_text().strip()
    port = env["ATOMFORGE_SERVICE_POSTGRES_PORT"]
    url = f"postgresql://atomforge:{password}@127.0.0.1:{port}/prefect"
    with psycopg.connect(url) as connection:
        (table,) = connection.execute("SELECT to_regclass('public.flow_run')").fetchone()
    assert table == "flow_run", "the server keeps its state in PostgreSQL"


def _submit(env: dict[str, str], queue: str, source: Path) -> str:
    """Create a ``simulate`` run of ``source`` in ``queue``, as ``run_deployment`` does."""
    parameters = {"source": {"path": str(source)}, "parameters": {"engine": "xtb"}}
    return create_deployment_run(
        env, "simulate/simulate", parameters=parameters, work_queue_name=queue
    )


def test_an_urgent_run_submitted_after_a_batch_run_starts_first(one_slot_service, tmp_path):
    env, _ = one_slot_service
    slow, water = tmp_path / "cluster.xyz", tmp_path / "water.xyz"
    slow.write_text(water_cluster_xyz(2))
    water.write_text(WATER_XYZ)
    blocker = _submit(env, "default", slow)
    api, auth = env["PREFECT_API_URL"], tuple(env["PREFECT_API_AUTH_STRING"].split(":", 1))
    _wait_for(api, auth, blocker, {"RUNNING", "COMPLETED"})
    batch = _submit(env, "batch", water)
    urgent = _submit(env, "urgent", water)
    runs = {
        name: _wait_for(api, auth, run, {"COMPLETED"})
        for name, run in {"blocker": blocker, "batch": batch, "urgent": urgent}.items()
    }
    assert runs["urgent"]["created"] < runs["blocker"]["end_time"], "the blocker ended too soon"
    assert runs["urgent"]["start_time"] < runs["batch"]["start_time"], runs


def _wait_for(api: str, auth: tuple, flow_run_id: str, states: set[str]) -> dict:
    import time

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", auth=auth, timeout=10).json()
        if run["state"]["type"] in states:
            return run
        assert run["state"]["type"] not in {"FAILED", "CRASHED", "CANCELLED"}, run["state"]
        time.sleep(0.5)
    raise AssertionError(f"{flow_run_id} never reached {states}")


def test_down_stops_every_part_and_status_says_so(one_slot_service):
    env, _ = one_slot_service
    stopped = service(env, "down")
    assert stopped.stdout.strip() == "stopped: worker, server, postgres"
    status = service(env, "status")
    assert status.returncode == 1
    assert [line.split()[1] for line in status.stdout.splitlines()] == ["DOWN"] * 4
