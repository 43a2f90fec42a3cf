"""The warm consumer: runs the flow runs of the service's process pool in children forked
from one warm process, with no worker launch in between.

``python -m atomforge.deployments.consumer`` (started by ``atomforge service up`` with the
worker's environment; ``ATOMFORGE_SERVICE_CONSUMER``) imports what flow runs use once
(:func:`~atomforge.deployments.warm_exec.warm_up`), starting no thread, and keeps one
plain HTTP client of the API. It counts the pool's due runs when the server announces
one (:mod:`~atomforge.deployments.wakeups`: every ``consumer_poll_seconds`` for a while
after, every ``idle_poll_seconds`` otherwise) and when a run of the pool or a child
ended, and, with room under its limit (``worker_limit``, the pool's own), takes them as a
worker does (the server orders them by queue priority and applies the pool's limits):
it claims each (Scheduled -> Pending, "claimed by consumer HOST pid N"; the server
refuses a run someone else took) and forks a child that runs it with Prefect's flow
engine (``run_flow``), skipping what a worker and ``python -m prefect.engine`` do first
(the job's set-up, a new process, reading the run and loading its flow: 1.1 s of a
2.8 s request). The child is the run's engine, as a worker's process would be: it sets
its states, runs its hooks, logs and stores its results.

It takes the runs of atomforge's own flows (entrypoint ``atomforge.flows...``) whose run
and deployment set no job variable; the process worker on the same pool starts the
others (a ``command`` or an ``env`` of their own), and every run while the consumer is
down. A run someone cancels has its child told so
(:mod:`atomforge.deployments.consumer_child`): the flow engine stops its tasks, the flow's
hooks stop its engines, and it ends Cancelled; a child still alive
:data:`CANCEL_GRACE_SECONDS` later is killed with its process group. A run someone
suspends (the UI's Suspend, an automation) has its child told too, and the flow engine
suspends it at its next step, as Prefect's own suspension observer would have it do: one
query of the consumer watches every child's run, where that observer opens a websocket
and a thread in each run (0.1-0.2 s of a request). A child that dies before its run
ended (killed, out of memory) has its run ended Crashed, with the flow's crash hooks. On
start it takes back what a consumer of this service that died left
(:meth:`Consumer.recover`). SIGTERM stops taking runs and waits for the children; when
atomforge's code changed and no child runs, it ``exec``-s itself anew.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import import_module

import httpx
import psutil
from prefect.flows import Flow

from atomforge.deployments.consumer_child import CANCEL, SUSPEND, run_end_hooks, run_flow_run
from atomforge.deployments.service import (
    POOL,
    ServiceSettings,
    api_client,
    auth_string,
    refresh_csrf,
)
from atomforge.deployments.wakeups import ScheduledRuns
from atomforge.deployments.warm_exec import warm_up
from atomforge.flows.local_server import code_stamp

MODULE = "atomforge.deployments.consumer"
READY_FILE = "consumer.ready"
WATCH_SECONDS = 0.5
"""How often the consumer looks for its runs that someone cancelled or suspended."""
CANCEL_GRACE_SECONDS = 30.0
"""How long a cancelled child has to stop its engines and end Cancelled before it is
killed with its process group."""
FLOW_PREFIX = "atomforge.flows."
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUNS_DIR = "consumer-runs"
"""The folder of the service where the consumer writes down each run it started (a
file named after the run, holding the child's pid), removed once the child ended."""
DEPLOYMENT_SECONDS = 30.0
"""How long the consumer trusts what it read of a deployment (a redeploy may change its
job variables)."""
CSRF_REFRESH_SECONDS = 1800.0
"""How often the consumer takes a new CSRF token (the server's last an hour)."""


@dataclass
class Child:
    """A run in a forked child: its flow run, the child's pid, the pipe that tells the
    child its run was cancelled or suspended, and whether it was told either."""

    run: dict
    flow: Flow
    pid: int
    pipe_fd: int
    cancelled_at: float | None = None
    suspended: bool = False

    @property
    def run_id(self) -> str:
        """Return the flow run's id."""
        return self.run["id"]


def owner() -> str:
    """Return how this consumer names itself in the states it sets."""
    return f"consumer {socket.gethostname()} pid {os.getpid()}"


def stop_orphan(pid: int, since: float) -> None:
    """Stop the process group of ``pid`` if that process is a child a dead consumer left
    (started before ``since``, the time its record was written), and wait for it."""
    try:
        process = psutil.Process(pid)
        if pid <= 1 or process.create_time() > since + 1:
            return
        os.killpg(pid, signal.SIGTERM)
        process.wait(timeout=CANCEL_GRACE_SECONDS)
    except (psutil.Error, ProcessLookupError, PermissionError):
        return


def flow_of(entrypoint: str | None) -> Flow | None:
    """Return the flow object of an atomforge ``module:name`` entrypoint, or None for any
    other entrypoint (those runs are left to the worker)."""
    if not entrypoint or not entrypoint.startswith(FLOW_PREFIX) or ":" not in entrypoint:
        return None
    module, _, name = entrypoint.partition(":")
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError):
        return None


class Consumer:
    """The consumer's loop: polling, claiming, forking, watching its children."""

    def __init__(self, settings: ServiceSettings, client: httpx.Client) -> None:
        self.settings = settings
        self.client = client
        self.children: dict[int, Child] = {}
        self.deployments: dict[str, tuple[float, Flow | None]] = {}
        self.stopping = False
        self.stamp = code_stamp()
        self.served = 0
        self.helpers: list[int] = []
        self.runs_dir = settings.dir / RUNS_DIR
        self.runs_dir.mkdir(exist_ok=True)
        auth = auth_string(settings)
        idle = settings.idle_poll_seconds
        self.wakeups = ScheduledRuns(settings.api_url, auth, POOL, idle, ends=True)

    def room(self) -> int:
        """Return how many more runs may start now."""
        return self.settings.worker_limit - len(self.children)

    def due(self, now: str) -> int:
        """Return how many runs of the pool are due (a count: a fraction of a poll's
        cost to the server)."""
        runs = {
            "state": {"type": {"any_": ["SCHEDULED"]}},
            "next_scheduled_start_time": {"before_": now},
        }
        pools = {"name": {"any_": [POOL]}}
        counted = self.client.post(
            "/flow_runs/count", json={"flow_runs": runs, "work_pools": pools}
        )
        counted.raise_for_status()
        return int(counted.json())

    def flow_for(self, run: dict) -> Flow | None:
        """Return the flow to run ``run`` with here, or None when the worker should (job
        variables of its own or of its deployment, a flow that is not atomforge's). What a
        deployment says is read again after :data:`DEPLOYMENT_SECONDS`."""
        if run.get("job_variables") or not run.get("deployment_id"):
            return None
        deployment_id = run["deployment_id"]
        read_at, flow = self.deployments.get(deployment_id, (0.0, None))
        if time.monotonic() - read_at > DEPLOYMENT_SECONDS:
            found = self.client.get(f"/deployments/{deployment_id}")
            if found.status_code != 200:
                return None
            deployment = found.json()
            own = not deployment.get("job_variables")
            flow = flow_of(deployment.get("entrypoint")) if own else None
            self.deployments[deployment_id] = (time.monotonic(), flow)
        return flow

    def set_state(
        self, run_id: str, kind: str, message: str, force: bool = False
    ) -> httpx.Response:
        """Propose the state ``kind`` (``PENDING``...) with ``message`` for the run
        ``run_id``; return the server's answer."""
        body = {"state": {"type": kind, "message": message}, "force": force}
        return self.client.post(f"/flow_runs/{run_id}/set_state", json=body)

    def claim(self, run: dict) -> dict | None:
        """Propose Pending for ``run``; return its new state, or None if refused."""
        proposed = self.set_state(run["id"], "PENDING", f"claimed by {owner()}")
        proposed.raise_for_status()
        answer = proposed.json()
        return answer["state"] if answer["status"] == "ACCEPT" else None

    def poll(self) -> None:
        """Take the due runs there is room for: claim each and start its child."""
        now = datetime.now(timezone.utc).isoformat()
        if self.room() <= 0 or not self.due(now):
            return
        body = {"limit": self.room(), "scheduled_before": now}
        found = self.client.post(f"/work_pools/{POOL}/get_scheduled_flow_runs", json=body)
        found.raise_for_status()
        running = {child.run_id for child in self.children.values()}
        for item in found.json():
            self.take(item["flow_run"], running)
            self.wakeups.found([item["flow_run"]["id"]])

    def take(self, run: dict, running: set[str]) -> None:
        """Claim the due ``run`` and start its child, unless the worker should run it, or
        its earlier child still runs (resumed before that child stopped: taken once it
        has; ``running`` holds the runs of the children)."""
        if run["id"] in running:
            return
        flow = self.flow_for(run)
        if flow is None:
            return
        state = self.claim(run)
        if state is not None:
            self.start(run | {"state": state}, flow)

    def start(self, run: dict, flow: Flow) -> None:
        """Fork the child that runs ``run``; in the child, run it and exit."""
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            self.set_state(run["id"], "SCHEDULED", f"the consumer could not fork: {exc}")
            print(f"flow run {run['id']}: could not fork ({exc}): scheduled again", flush=True)
            return
        if pid == 0:
            os.close(write_fd)
            self.wakeups.close()
            os._exit(run_flow_run(run, flow, read_fd))
        os.close(read_fd)
        (self.runs_dir / run["id"]).write_text(str(pid))
        self.children[pid] = Child(run, flow, pid, write_fd)
        self.served += 1
        print(f"flow run {run['id']} ({run.get('name')}): pid {pid}", flush=True)

    def reap(self) -> bool:
        """Collect the children that ended; end Crashed the run of one that died before
        its run ended. Return whether any ended (its room may go to a waiting run)."""
        ended = False
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if not done:
                continue
            child = self.children.pop(pid)
            ended = True
            os.close(child.pipe_fd)
            code = os.waitstatus_to_exitcode(status)
            print(f"flow run {child.run_id}: pid {pid} exited {code}", flush=True)
            if code != 0:
                self.end_if_left(child, f"its process exited with {code}")
            (self.runs_dir / child.run_id).unlink(missing_ok=True)
        return ended

    def end_if_left(self, child: Child, why: str) -> None:
        """End ``child``'s run if it is not final, suspended or scheduled again (resumed):
        Cancelled if it was being cancelled, else Crashed with the flow's crash hooks (run
        in a forked helper)."""
        found = self.client.get(f"/flow_runs/{child.run_id}")
        if found.status_code != 200:
            return
        state = found.json().get("state") or {}
        kind = state.get("type")
        if kind in FINAL or kind == "SCHEDULED" or state.get("name") == "Suspended":
            return  # ended, or suspended (or resumed since): it starts anew when resumed
        ending = "CANCELLED" if kind == "CANCELLING" else "CRASHED"
        message = f"{why} ({owner()})"
        self.set_state(child.run_id, ending, message, force=True).raise_for_status()
        print(f"flow run {child.run_id}: {ending.lower()}: {message}", flush=True)
        self.run_hooks(child.run_id, child.flow)

    def run_hooks(self, run_id: str, flow: Flow) -> None:
        """Run ``flow``'s hooks for the final state of ``run_id`` in a forked helper (this
        process starts no thread: its children are forked)."""
        helper = os.fork()
        if helper == 0:
            self.wakeups.close()
            os._exit(run_end_hooks(run_id, flow))
        self.helpers.append(helper)

    def watch_runs(self) -> None:
        """Tell each child whose run someone cancelled or suspended; kill a cancelled child
        that outlives the grace."""
        if not self.children:
            return
        by_run = {child.run_id: child for child in self.children.values()}
        body = {
            "flow_runs": {
                "id": {"any_": list(by_run)},
                "state": {"type": {"any_": ["CANCELLING", "CANCELLED", "PAUSED"]}},
            }
        }
        found = self.client.post("/flow_runs/filter", json=body)
        found.raise_for_status()
        for run in found.json():
            child = by_run[run["id"]]
            if run["state"]["type"] == "PAUSED":
                self.tell_suspended(child, run["state"].get("name"))
            else:
                self.tell_cancelled(child)

    def tell_cancelled(self, child: Child) -> None:
        """Tell ``child`` its run is cancelled, once; kill it with its process group once
        it outlived :data:`CANCEL_GRACE_SECONDS`."""
        now = time.monotonic()
        if child.cancelled_at is None:
            child.cancelled_at = now
            print(f"flow run {child.run_id}: cancelled, telling pid {child.pid}", flush=True)
            with contextlib.suppress(OSError):
                os.write(child.pipe_fd, CANCEL)
        elif now - child.cancelled_at > CANCEL_GRACE_SECONDS:
            print(f"flow run {child.run_id}: pid {child.pid} still alive: killed", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    def tell_suspended(self, child: Child, name: str | None) -> None:
        """Tell ``child`` its run is suspended (a Paused state named Suspended), once; a
        Paused state the flow set itself needs no word."""
        if name != "Suspended" or child.suspended:
            return
        child.suspended = True
        print(f"flow run {child.run_id}: suspended, telling pid {child.pid}", flush=True)
        with contextlib.suppress(OSError):
            os.write(child.pipe_fd, SUSPEND)

    def reap_helpers(self) -> None:
        """Collect the hook helpers that ended."""
        for pid in list(self.helpers):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            self.helpers.remove(pid)

    def recover(self) -> dict[str, int]:
        """Take back the runs a consumer of this service that died left (its records in
        :data:`RUNS_DIR`): a child still alive is stopped (SIGTERM: its run ends
        Crashed), a run left Pending is scheduled again (nothing of it ran), one left
        Running or Cancelling ends Crashed or Cancelled with its flow's hooks; return how
        many of each."""
        counts = {"scheduled again": 0, "crashed": 0, "cancelled": 0}
        for record in sorted(self.runs_dir.glob("*")):
            pid = int(record.read_text() or 0)
            said = f"flow run {record.name}: left by a consumer that stopped (pid {pid})"
            print(said, flush=True)
            stop_orphan(pid, record.stat().st_mtime)
            found = self.client.get(f"/flow_runs/{record.name}")
            state = (found.json().get("state") or {}) if found.status_code == 200 else {}
            kind = state.get("type")
            if kind in ("PENDING", "RUNNING", "CANCELLING"):
                ending, count = {
                    "PENDING": ("SCHEDULED", "scheduled again"),
                    "CANCELLING": ("CANCELLED", "cancelled"),
                    "RUNNING": ("CRASHED", "crashed"),
                }[kind]
                self.set_state(record.name, ending, "the consumer that ran it stopped", force=True)
                counts[count] += 1
                flow = self.flow_for(found.json() | {"job_variables": {}})
                if ending != "SCHEDULED" and flow is not None:
                    self.run_hooks(record.name, flow)
            record.unlink()
        while self.helpers:
            self.reap_helpers()
            time.sleep(0.1)
        return counts

    def stale(self) -> bool:
        """Return whether atomforge's code changed since this consumer started."""
        return code_stamp() != self.stamp

    def serve(self, ready: str) -> bool:
        """Poll, start and watch until SIGTERM (then wait for the children), or until the
        code changed while no child runs; return whether it stopped for the code."""
        with open(ready, "w") as marker:
            marker.write(str(os.getpid()))
        print(f"consumer ready on pool {POOL}, pid {os.getpid()}", flush=True)
        watched = checked = refreshed = time.monotonic()
        while not (self.stopping and not self.children):
            self.reap_helpers()
            try:
                freed = self.reap()
                if not self.stopping and self.wakeups.poll_due(also=freed):
                    self.poll()
                if time.monotonic() - watched >= WATCH_SECONDS:
                    watched = time.monotonic()
                    self.watch_runs()
            except httpx.HTTPError as exc:  # the server may be restarting: ask again
                print(f"API call failed: {type(exc).__name__}: {exc}", flush=True)
                time.sleep(1.0)
            if time.monotonic() - refreshed > CSRF_REFRESH_SECONDS:
                with contextlib.suppress(httpx.HTTPError):
                    refresh_csrf(self.client)
                    refreshed = time.monotonic()
            if time.monotonic() - checked > 5.0:
                checked = time.monotonic()
                if not self.children and self.stale():
                    print("atomforge's code changed: starting anew", flush=True)
                    return True
            self.wakeups.wait(self.settings.consumer_poll_seconds)
        return False


def main() -> int:
    """Run the consumer until SIGTERM or SIGINT; return its exit code (in a forked child,
    the child exits with its run instead)."""
    began = time.monotonic()
    warm_up()
    print(f"imports took {time.monotonic() - began:.1f} s", flush=True)
    settings = ServiceSettings()
    ready = settings.dir / READY_FILE
    with api_client(settings) as client:
        consumer = Consumer(settings, client)
        counts = consumer.recover()
        if any(counts.values()):
            print(f"taken back from a consumer that stopped: {counts}", flush=True)

        def stop(signum: int, frame: object) -> None:
            consumer.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            stale = consumer.serve(str(ready))
        finally:
            ready.unlink(missing_ok=True)
    print(f"consumer stopped after {consumer.served} run(s)", flush=True)
    if stale:
        os.execv(sys.executable, [sys.executable, "-m", MODULE])
    return 0


if __name__ == "__main__":
    sys.exit(main())
