"""The service's pollers hear the Prefect server announce scheduled runs: a subscriber of
a pool wakes for that pool's runs only (a real ``prefect server start``, its events
websocket), asks the server at once and for a while after, until its polls found the
runs announced, once when a run of its pool ended, then seldom; without the server's
stream it polls every round, as it did before it listened."""

from __future__ import annotations

import time
from uuid import uuid4

import httpx
import pytest

from atomforge.deployments.consumer import Consumer
from atomforge.deployments.service import ServiceSettings
from atomforge.deployments.wakeups import ALERT_SECONDS, ScheduledRuns
from tests.prefect_server import api_post, free_port, server_env, start_server, stop

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A plain Prefect server; yield its client environment."""
    home = tmp_path_factory.mktemp("wakeups")
    env = server_env(home)
    proc = start_server(env, home / "server.log")
    try:
        yield env
    finally:
        stop(proc)


def _deployment_in(env: dict[str, str], pool: str) -> str:
    """Create a work pool ``pool`` and a deployment of a flow on it; return its id."""
    api_post(env, "/work_pools/", {"name": pool, "type": "process"})
    flow = api_post(env, "/flows/", {"name": f"flow-{uuid4().hex[:8]}"})
    body = {"name": "d", "flow_id": flow["id"], "work_pool_name": pool, "entrypoint": "x.py:f"}
    return api_post(env, "/deployments/", body)["id"]


def _heard_within(subscriber: ScheduledRuns, seconds: float) -> bool:
    """Return whether ``subscriber`` hears a run of its pool within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        subscriber.wait(0.2)
        if subscriber.unseen:
            return True
    return False


def test_a_scheduled_run_wakes_the_subscriber_of_its_pool_and_not_another(server):
    deployment = _deployment_in(server, "pool-a")
    _deployment_in(server, "pool-b")
    url = server["PREFECT_API_URL"]
    of_a = ScheduledRuns(url, "", "pool-a", idle_poll_seconds=3600, ends=True)
    of_b = ScheduledRuns(url, "", "pool-b", idle_poll_seconds=3600)
    assert of_a.connect() and of_b.connect()
    time.sleep(ALERT_SECONDS)  # a fresh subscription counts as a word: let it pass
    assert of_a.poll_due() and not of_a.poll_due()
    run = api_post(server, f"/deployments/{deployment}/create_flow_run", {})
    assert _heard_within(of_a, 30)
    assert of_a.poll_due() and of_a.poll_due()  # asks every round for a while after
    assert not _heard_within(of_b, 2)
    assert of_b.poll_due() and not of_b.poll_due()

    time.sleep(ALERT_SECONDS)
    assert not of_a.poll_due()
    cancelled = {"state": {"type": "CANCELLED"}, "force": True}
    api_post(server, f"/flow_runs/{run['id']}/set_state", cancelled)
    deadline = time.monotonic() + 30
    while not of_a.ended and time.monotonic() < deadline:
        of_a.wait(0.2)
    assert of_a.poll_due() and not of_a.poll_due()  # a run that ended: one poll
    of_a.close()
    of_b.close()


def _heard(subscriber: ScheduledRuns, run_id: str) -> float:
    """Return when ``subscriber`` heard ``run_id`` announced, waiting up to 30 s."""
    deadline = time.monotonic() + 30
    while run_id not in subscriber.unseen and time.monotonic() < deadline:
        subscriber.wait(0.2)
    return subscriber.unseen[run_id]


def test_the_polls_after_announcements_stop_once_the_announced_runs_are_found(server):
    deployment = _deployment_in(server, "pool-c")
    subscriber = ScheduledRuns(server["PREFECT_API_URL"], "", "pool-c", idle_poll_seconds=3600)
    assert subscriber.connect()
    assert subscriber.poll_due()
    subscriber.found([])
    assert subscriber.poll_due()  # a fresh subscription's window: runs it was not told of
    time.sleep(ALERT_SECONDS)
    assert not subscriber.poll_due()

    create = f"/deployments/{deployment}/create_flow_run"
    runs = [api_post(server, create, {})["id"] for _ in range(2)]
    for run_id in runs:
        _heard(subscriber, run_id)
    subscriber.found([])  # not visible yet
    assert subscriber.poll_due()
    subscriber.found([runs[0], "a run of the pool it was not told of"])
    assert subscriber.poll_due()  # one announced run is still unseen
    subscriber.found([runs[1]])
    assert not subscriber.poll_due()  # both found: no more asks until the idle poll

    early = api_post(server, create, {})["id"]
    subscriber.found([early])  # found by a poll before its announcement is read
    deadline = time.monotonic() + 30
    while not subscriber.read() and time.monotonic() < deadline:
        time.sleep(0.1)  # until its announcement is read
    assert time.monotonic() < deadline and not subscriber.unseen
    assert not subscriber.poll_due()

    never = api_post(server, create, {})["id"]  # taken by another poller, say
    heard = _heard(subscriber, never)
    time.sleep(ALERT_SECONDS / 2)
    later = api_post(server, create, {})["id"]
    _heard(subscriber, later)
    time.sleep(max(0.0, heard + ALERT_SECONDS - time.monotonic()) + 0.05)
    assert subscriber.poll_due()  # the later one is still unseen
    assert list(subscriber.unseen) == [later]  # the other was forgotten after its window
    subscriber.close()


def test_the_consumer_polls_until_it_found_the_runs_announced(server, tmp_path):
    pool = "atomforge-process"
    deployment = _deployment_in(server, pool)
    port = int(server["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0])
    settings = ServiceSettings(dir=tmp_path, host="127.0.0.1", port=port, idle_poll_seconds=3600)
    with httpx.Client(base_url=server["PREFECT_API_URL"], timeout=10) as client:
        consumer = Consumer(settings, client)
        assert consumer.wakeups.pool == pool and consumer.wakeups.connect()
        time.sleep(ALERT_SECONDS)
        consumer.wakeups.poll_due()
        body = {"job_variables": {"command": "true"}}  # the worker's: the consumer leaves it
        run = api_post(server, f"/deployments/{deployment}/create_flow_run", body)
        _heard(consumer.wakeups, run["id"])
        deadline = time.monotonic() + 30
        while consumer.wakeups.poll_due() and time.monotonic() < deadline:
            consumer.poll()
            time.sleep(0.2)
        assert run["id"] in consumer.wakeups.found_at  # found, not forgotten after 2 s
        assert not consumer.wakeups.unseen and not consumer.wakeups.poll_due()
        consumer.wakeups.close()


def test_a_stream_lost_with_its_server_means_polling_every_round(tmp_path):
    env = server_env(tmp_path)
    proc = start_server(env, tmp_path / "server.log")
    subscriber = ScheduledRuns(env["PREFECT_API_URL"], "", "pool-a", idle_poll_seconds=3600)
    try:
        assert subscriber.connect()
        time.sleep(ALERT_SECONDS)
        subscriber.poll_due()
        assert not subscriber.poll_due()
    finally:
        stop(proc)
    subscriber.wait(5.0)  # reads the close
    assert not subscriber.connected
    assert subscriber.poll_due() and subscriber.poll_due()
    assert not subscriber.connect()  # no server: it keeps polling


def test_without_a_server_a_poller_polls_every_round():
    url = f"http://127.0.0.1:{free_port()}/api"
    subscriber = ScheduledRuns(url, "", "pool-a", idle_poll_seconds=3600)
    assert not subscriber.connect()
    assert all(subscriber.poll_due() for _ in range(3))
