"""What a batcher does when it starts: end or re-run what a batcher that died left behind.

A batcher names itself (host and pid) in the message of every state it sets: a request
it claimed is ``Pending`` "claimed by batcher HOST pid N", one in a batch ``Running`` "in
batch BATCH (batcher HOST pid N)". When a batcher starts, the requests of the batch pool
left in those states by a batcher of this host that no longer runs are taken back:

- a claimed request (Pending) is scheduled again: nothing of it was computed;
- a request whose batch was running is scheduled again once (its structure is computed
  again, or reused if the batch stored it), and ends Crashed if its batch died a second
  time (``run_count`` 2): a request that kills its batcher does not loop;
- a request left Cancelling ends Cancelled.

The batch runs those requests name, still Running, end Crashed, and the ``screen`` flow's
crash hooks record it (``run.json`` and every structure's document).
Requests of another host's batcher are left alone.
"""

from __future__ import annotations

import asyncio
import re
import socket
from uuid import UUID

import psutil
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from prefect.flows import Flow
from prefect.states import Cancelled, Crashed, Scheduled

OWNER = re.compile(r"batcher (?P<host>\S+) pid (?P<pid>\d+)")
BATCH = re.compile(r"in batch (?P<id>[0-9a-f-]{36})")
MODULE = "atomforge.deployments.batcher"
MAX_RUNS = 2
"""A request whose batch died this many times ends Crashed instead of running again."""
LEFT_STATES = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


def batcher_alive(pid: int) -> bool:
    """Return whether process ``pid`` of this host is a running batcher."""
    try:
        return MODULE in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def orphaned(run: FlowRun, host: str | None = None) -> bool:
    """Return whether ``run`` was claimed by a batcher of this host that no longer runs."""
    message = (run.state.message if run.state else None) or ""
    owner = OWNER.search(message)
    if owner is None:
        return False
    return owner["host"] == (host or socket.gethostname()) and not batcher_alive(int(owner["pid"]))


async def left_runs(client: PrefectClient, pool: str) -> list[FlowRun]:
    """Return the runs of ``pool`` left Pending, Running or Cancelling."""
    states = FlowRunFilterState(type=FlowRunFilterStateType(any_=LEFT_STATES))
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=states),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
    )


async def _crash_batch(client: PrefectClient, batch_flow: Flow, batch_id: UUID) -> None:
    """End a batch run a dead batcher left running: Crashed, with the flow's crash hooks
    (nothing for one that ended, or is gone)."""
    try:
        run = await client.read_flow_run(batch_id)
    except ObjectNotFound:
        return
    if run.state is None or run.state.is_final():
        return
    state = Crashed(message="the batcher running this batch stopped")
    await client.set_flow_run_state(batch_id, state, force=True)
    for hook in batch_flow.on_crashed_hooks:
        await asyncio.to_thread(hook, batch_flow, run, state)


async def recover(client: PrefectClient, pool: str, batch_flow: Flow) -> dict[str, int]:
    """Take back the requests of ``pool`` a dead batcher of this host left, and crash
    their batch runs; return how many requests were scheduled again, crashed and
    cancelled."""
    counts = {"scheduled again": 0, "crashed": 0, "cancelled": 0}
    batches: set[UUID] = set()
    for run in await left_runs(client, pool):
        assert run.state is not None
        if run.state.type is StateType.CANCELLING:
            await client.set_flow_run_state(run.id, Cancelled(message="cancelled"))
            counts["cancelled"] += 1
            continue
        if not orphaned(run):
            continue
        if found := BATCH.search(run.state.message or ""):
            batches.add(UUID(found["id"]))
        if run.state.type is StateType.RUNNING and run.run_count >= MAX_RUNS:
            why = f"its batch died {run.run_count} times with its batcher; not run again"
            await client.set_flow_run_state(run.id, Crashed(message=why))
            counts["crashed"] += 1
        else:
            again = Scheduled(message="the batcher that claimed it stopped: scheduled again")
            await client.set_flow_run_state(run.id, again)
            counts["scheduled again"] += 1
    for batch_id in batches:
        await _crash_batch(client, batch_flow, batch_id)
    return counts
