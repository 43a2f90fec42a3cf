"""The batcher: serves the batched deployment (``simulate/batched``) by computing its
requests together, in batches, in one warm process.

``python -m atomforge.deployments.batcher`` (started by ``atomforge service up`` with the
worker's environment; settings ``ATOMFORGE_SERVICE_BATCH_*`` of
:class:`~atomforge.deployments.service.ServiceSettings`) imports the flows once and keeps
one Prefect client. Like a worker, it takes the scheduled runs of the ``atomforge-batch``
pool, oldest first, and sends a worker heartbeat, so the pool shows Ready. When the
server announces a request (:mod:`~atomforge.deployments.wakeups`), every
``batch_poll_seconds`` for a while after and while requests are claimed, and every
``idle_poll_seconds`` otherwise, it counts the due requests (a third of the server's
work of a worker's poll), and when there are some, claims up to ``batch_max`` of them in one call
(Scheduled -> Pending; the server refuses a request someone else took or cancelled).
Requests are collected for ``batch_window_seconds`` after the first one, or until
``batch_max`` wait, then checked (a bad one fails alone), grouped by identical
parameters and options, and each group is computed in one ``screen`` run in this process
(:mod:`atomforge.deployments.batch_run`). At most ``batch_concurrency`` batches run at
once; while they all run, nothing is polled and new requests wait Scheduled, so that the
next poll takes a full batch. A batch run cancelled in the UI has its engines stopped.

On start it takes back what a dead batcher left (:mod:`atomforge.deployments.batch_recovery`).
SIGTERM stops taking requests, gives back those claimed but not in a batch (Scheduled
again) and waits up to 25 s for the batches in flight. When atomforge's code changed and
no request waits, it ``exec``-s itself anew, as the warm executor does.

The asyncio loop runs in a thread of its own: Prefect's flow engine installs a SIGTERM
handler for the runs it starts when it runs in the main thread, which would swap the
batcher's own between concurrent batches; the main thread only waits for signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import WorkerFlowRunResponse
from prefect.context import AsyncClientContext
from prefect.flows import Flow
from prefect.results import ResultStore
from prefect.states import Crashed, Pending, Scheduled
from pydantic import TypeAdapter

from atomforge.deployments.batch_recovery import MODULE, recover
from atomforge.deployments.batch_requests import Request, group, one_line, prepare
from atomforge.deployments.batch_run import (
    Context,
    fail_request,
    propose_many,
    run_group,
    stop_batch,
)
from atomforge.deployments.service import BATCH_POOL, ServiceSettings, auth_string
from atomforge.deployments.wakeups import ScheduledRuns
from atomforge.flows.local_server import code_stamp
from atomforge.flows.screen import screen
from atomforge.flows.simulate import simulate

READY_FILE = "batcher.ready"
HEARTBEAT_SECONDS = 30.0
CANCEL_WATCH_SECONDS = 0.5
CODE_CHECK_SECONDS = 5.0
"""How often an idle batcher looks whether atomforge's code changed (then it starts anew,
as the warm executor does, so that requests never run stale code)."""
STOP_WAIT_SECONDS = 25.0
"""How long SIGTERM waits for the batches in flight (the service kills after 30 s)."""
RESPONSES = TypeAdapter(list[WorkerFlowRunResponse])


class Batcher:
    """The state of the batcher's loop: requests claimed and waiting for a batch, and the
    batches in flight."""

    def __init__(self, settings: ServiceSettings, ctx: Context) -> None:
        self.settings = settings
        self.ctx = ctx
        self.claimed: list[Request] = []
        self.in_flight: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self.served = 0
        self.stamp = code_stamp()
        self.stale = False
        auth = auth_string(settings)
        idle = settings.idle_poll_seconds
        self.wakeups = ScheduledRuns(settings.api_url, auth, BATCH_POOL, idle)
        self.woken = asyncio.Event()
        self.freed = True

    async def waiting(self, now: str) -> int:
        """Return how many requests of the pool are due (Scheduled, not later than
        ``now``): a count costs the server about a third of a worker's poll."""
        runs = {
            "state": {"type": {"any_": [StateType.SCHEDULED.value]}},
            "next_scheduled_start_time": {"before_": now},
        }
        pools = {"name": {"any_": [BATCH_POOL]}}
        response = await self.ctx.client.request(
            "POST", "/flow_runs/count", json={"flow_runs": runs, "work_pools": pools}
        )
        return int(response.json())

    async def poll(self) -> None:
        """Claim due requests of the pool (Scheduled -> Pending, in one call), up to one
        batch's worth waiting, oldest first, as a worker takes runs."""
        room = self.settings.batch_max - len(self.claimed)
        now = datetime.now(timezone.utc).isoformat()
        if room <= 0 or not await self.waiting(now):
            return
        response = await self.ctx.client.request(
            "POST",
            "/work_pools/{name}/get_scheduled_flow_runs",
            path_params={"name": BATCH_POOL},
            json={"limit": room, "scheduled_before": now},
        )
        found = RESPONSES.validate_python(response.json())
        if not found:
            return
        began = time.time()
        candidates = [Request(run=item.flow_run, claimed_at=began) for item in found]
        claim = Pending(message=f"claimed by {self.ctx.owner}")
        ended = await propose_many(self.ctx, candidates, claim)
        self.wakeups.found(r.id for r in candidates)
        self.claimed += [r for r in candidates if ended.get(r.id) is StateType.PENDING]

    def due(self) -> bool:
        """Return whether the requests claimed make a batch now: the window since the
        first one has passed or a batch is full, and fewer batches than the limit run."""
        if not self.claimed or len(self.in_flight) >= self.settings.batch_concurrency:
            return False
        full = len(self.claimed) >= self.settings.batch_max
        waited = time.time() - self.claimed[0].claimed_at
        return full or waited >= self.settings.batch_window_seconds

    def dispatch(self) -> None:
        """Start a batch of the claimed requests."""
        requests, self.claimed = self.claimed, []
        task = asyncio.create_task(self.run_batch(requests))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def run_batch(self, requests: list[Request]) -> None:
        """Check ``requests``, fail the bad ones, and compute each group in a batch run."""
        began = time.monotonic()
        flow = self.ctx.request_flow
        await asyncio.to_thread(lambda: [prepare(r, flow) for r in requests])
        bad = [r for r in requests if r.error is not None]
        groups = group(requests)
        results = await asyncio.gather(
            *(run_group(self.ctx, g) for g in groups),
            *(fail_request(self.ctx, r, r.error or "") for r in bad),
            return_exceptions=True,
        )
        for requests_of, result in zip(groups, results):
            if isinstance(result, BaseException):
                await self.crash(requests_of, result)
        self.served += len(requests)
        print(
            f"{len(requests)} request(s), {len(bad)} bad, in {time.monotonic() - began:.2f} s",
            flush=True,
        )

    async def crash(self, requests: list[Request], error: BaseException) -> None:
        """End the requests of a batch that failed before it ended them (the server went
        away, a bug): Crashed, saying why, rather than left claimed."""
        why = f"the batcher could not compute it: {one_line(error)}"
        print(f"a batch of {len(requests)} request(s) failed: {why}", flush=True)
        with contextlib.suppress(Exception):  # recovery takes them back on the next start
            await propose_many(self.ctx, requests, Crashed(message=why))

    async def watch_cancellations(self) -> None:
        """Stop the engines of batch runs someone cancelled (in the UI, by the CLI)."""
        while not self.stopping.is_set():
            await self.sleep(CANCEL_WATCH_SECONDS)
            batches = {k: b for k, b in self.ctx.batches.items() if not b.cancelled}
            if not batches:
                continue
            ids = FlowRunFilter(id=FlowRunFilterId(any_=list(batches)))
            with contextlib.suppress(Exception):  # the next round asks again
                for run in await self.ctx.client.read_flow_runs(flow_run_filter=ids):
                    stopped = (StateType.CANCELLING, StateType.CANCELLED)
                    if run.state and run.state.type in stopped and run.id in batches:
                        print(f"batch {run.id} cancelled: stopping its engines", flush=True)
                        await asyncio.to_thread(stop_batch, batches[run.id])

    async def heartbeat(self) -> None:
        """Tell the server every :data:`HEARTBEAT_SECONDS` that the pool has a worker."""
        name = f"atomforge-batcher {socket.gethostname()}"
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):  # the next beat tries again
                await self.ctx.client.send_worker_heartbeat(
                    BATCH_POOL, name, heartbeat_interval_seconds=HEARTBEAT_SECONDS
                )
            await self.sleep(HEARTBEAT_SECONDS)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the batcher is stopping."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def nap(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the batcher is stopping or the server announces a
        request (subscribing to its announcements first if not subscribed)."""
        await self.listen()
        waits = [asyncio.ensure_future(e.wait()) for e in (self.stopping, self.woken)]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        self.woken.clear()

    async def listen(self) -> None:
        """Subscribe to the server's announcements of the pool's requests, unless
        subscribed (or tried too recently), and hear them as they come."""
        if not self.wakeups.may_connect or not await asyncio.to_thread(self.wakeups.connect):
            return
        fd = self.wakeups.fileno()
        asyncio.get_running_loop().add_reader(fd, self.hear, fd)

    def hear(self, fd: int) -> None:
        """Read the announcements the socket ``fd`` holds; wake the loop for a request;
        stop reading a lost subscription (:meth:`listen` subscribes again)."""
        if self.wakeups.read():
            self.woken.set()
        if not self.wakeups.connected:
            asyncio.get_running_loop().remove_reader(fd)

    def stop_listening(self) -> None:
        """Close the subscription to the server's announcements."""
        if self.wakeups.connected:
            asyncio.get_running_loop().remove_reader(self.wakeups.fileno())
            self.wakeups.close()

    async def serve(self) -> None:
        """Poll and dispatch until stopped, or until atomforge's code changed while no
        request waits (``stale``: the caller starts a new batcher); then give back the
        requests not started and wait for the batches in flight. Polls only while fewer
        batches than the limit run: meanwhile requests wait Scheduled, and the next poll
        takes a full batch of them."""
        background = [
            asyncio.create_task(self.heartbeat()),
            asyncio.create_task(self.watch_cancellations()),
        ]
        checked = time.monotonic()
        while not self.stopping.is_set():
            if len(self.in_flight) >= self.settings.batch_concurrency:
                stop = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait([*self.in_flight, stop], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                self.freed = True
                continue
            try:
                if self.wakeups.poll_due(also=self.freed or bool(self.claimed)):
                    await self.poll()
                    self.freed = False
            except Exception as exc:  # the server may be restarting: poll again
                print(f"poll failed: {type(exc).__name__}: {exc}", flush=True)
                await self.sleep(1.0)
            if self.due():
                self.dispatch()
                self.freed = True  # a full batch may have left requests waiting
                continue
            if time.monotonic() - checked > CODE_CHECK_SECONDS:
                checked = time.monotonic()
                if not self.claimed and not self.in_flight and code_stamp() != self.stamp:
                    print("atomforge's code changed: starting anew", flush=True)
                    self.stale = True
                    break
            await self.nap(self.settings.batch_poll_seconds)
        self.stop_listening()
        await self.give_back()
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=STOP_WAIT_SECONDS)
        for task in background:
            task.cancel()

    async def give_back(self) -> None:
        """Schedule again the requests claimed but not in a batch yet."""
        again = Scheduled(message="the batcher stopped before its batch: scheduled again")
        waiting, self.claimed = self.claimed, []
        if waiting:
            await propose_many(self.ctx, waiting, again)


def batch_flow() -> Flow:
    """Return the flow a batch runs: ``screen``, keeping the name its run is created with."""
    flow = screen.with_options()
    flow.flow_run_name = None
    return flow


async def run(settings: ServiceSettings, stop: threading.Event, ready: Path) -> bool:
    """Serve the pool until ``stop`` is set, writing ``ready`` once serving; return
    whether it stopped because atomforge's code changed."""
    async with AsyncClientContext.get_or_create() as client_context:
        client = client_context.client or get_client()
        store = await ResultStore().aupdate_for_flow(simulate)
        ctx = Context(client, simulate, batch_flow(), store)
        counts = await recover(client, BATCH_POOL, ctx.batch_flow)
        if any(counts.values()):
            print(f"taken back from a batcher that stopped: {counts}", flush=True)
        batcher = Batcher(settings, ctx)
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=lambda: (stop.wait(), loop.call_soon_threadsafe(batcher.stopping.set)),
            daemon=True,
        ).start()
        ready.write_text(str(os.getpid()))
        print(f"batcher ready on pool {BATCH_POOL}, pid {os.getpid()}", flush=True)
        await batcher.serve()
        print(f"batcher stopped after {batcher.served} request(s)", flush=True)
        return batcher.stale


def main() -> int:
    """Run the batcher until SIGTERM or SIGINT; return its exit code. When atomforge's
    code changed, this process becomes a new batcher (``exec``: same pid)."""
    settings = ServiceSettings()
    ready = settings.dir / READY_FILE
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    failed: list[BaseException] = []
    stale: list[bool] = []

    def serve() -> None:
        try:
            stale.append(asyncio.run(run(settings, stop, ready)))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=serve, name="batcher")
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    finally:
        ready.unlink(missing_ok=True)
    if failed:
        print(f"batcher failed: {type(failed[0]).__name__}: {failed[0]}", flush=True)
        return 1
    if stale and stale[0] and not stop.is_set():
        os.execv(sys.executable, [sys.executable, "-m", MODULE])
    return 0


if __name__ == "__main__":
    sys.exit(main())
