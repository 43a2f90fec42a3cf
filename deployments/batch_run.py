"""One batch: a group of requests computed together in one ``screen`` flow run, then each
request ended with its own result.

:func:`run_group` creates the batch's flow run (``batch of N simulate requests: ...``,
tagged ``batched``, its structures named ``<request id prefix>-<name>``), moves each
request Pending -> Running with a message naming that run (a request cancelled
meanwhile is left out and ends Cancelled), runs ``screen`` on their structures in this
process, and then, for each request: its own result document and ``run.json`` in
atomforge's store (the batch's document copied under the request's run, ``reused_from``
naming it), a persisted Prefect result (the document, as ``simulate`` returns it), a
markdown artifact and a log line saying where its result is and which batch computed
it, and its final state: Completed, or Failed with its structure's one-line error
(Cancelled if its batch was cancelled before its structure finished).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.flow_engine import run_flow_async
from prefect.flows import Flow
from prefect.logging.loggers import flow_run_logger
from prefect.results import ResultStore
from prefect.states import (
    Cancelled,
    Completed,
    Crashed,
    Failed,
    Pending,
    Running,
    Scheduled,
    State,
    to_state_create,
)
from prefect.utilities.urls import url_for

from atomforge.deployments.batch_requests import (
    Request,
    batch_options,
    batch_source,
    one_line,
    unique_names,
)
from atomforge.engines.structures import to_extxyz
from atomforge.flows.hooks import stop_run_engines
from atomforge.flows.models import RunSummary, StructureResult
from atomforge.flows.paths import RunPaths, run_paths
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import iter_results, save_result, save_run

BATCH_TAGS = ("atomforge", "batched")
REQUEST_FLOW = "simulate"
API_CALLS_AT_ONCE = 8
"""Requests whose state changes, artifacts and results are sent to the API at once."""

FINAL = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED})
T = TypeVar("T")


def owner_name() -> str:
    """Return how this batcher names itself in the states it sets: host and pid."""
    return f"batcher {socket.gethostname()} pid {os.getpid()}"


@dataclass
class Batch:
    """A batch run in flight: its flow run, its folders, and whether it was cancelled."""

    run: FlowRun
    paths: RunPaths
    cancelled: bool = False


@dataclass
class Context:
    """What every batch of one batcher shares: the API client, the ``simulate`` flow (the
    requests' flow) and the flow that computes a batch, the result store of ``simulate``,
    the batcher's name, and its batches in flight (watched for cancellation)."""

    client: PrefectClient
    request_flow: Flow
    batch_flow: Flow
    result_store: ResultStore
    owner: str = field(default_factory=owner_name)
    batches: dict[UUID, Batch] = field(default_factory=dict)
    limiter: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(API_CALLS_AT_ONCE))

    async def limited(self, call: Awaitable[T]) -> T:
        """Return ``call``'s result, with at most :data:`API_CALLS_AT_ONCE` at once."""
        async with self.limiter:
            return await call


async def propose(ctx: Context, request: Request, state: State) -> StateType | None:
    """Propose ``state`` for ``request``; return the state type the request is in after
    it (None when the API gave none, or the run is gone). A request found Cancelling is
    made Cancelled."""
    try:
        result = await ctx.limited(ctx.client.set_flow_run_state(request.run.id, state))
    except ObjectNotFound:
        return None
    if result.status is SetStateStatus.ACCEPT:
        return state.type
    now = result.state.type if result.state else None
    if now is StateType.CANCELLING:
        cancelled = Cancelled(message="cancelled before its result was ready")
        await ctx.limited(ctx.client.set_flow_run_state(request.run.id, cancelled))
        return StateType.CANCELLED
    return now


BULK_LIMIT = 50
"""Most runs one ``/flow_runs/bulk_set_state`` call may change (the server's limit)."""


async def propose_many(
    ctx: Context, requests: list[Request], state: State
) -> dict[str, StateType | None]:
    """Propose ``state`` for every request in one API call per :data:`BULK_LIMIT` (each
    orchestrated on its own, as :func:`propose` does: about half the server's CPU of a
    call per run); return the state each request is in after it, by id. A request found
    Cancelling is made Cancelled; without the bulk endpoint (an older server), one call
    per request."""
    ended: dict[str, StateType | None] = {}
    body = {"state": to_state_create(state).model_dump(mode="json", serialize_as_any=True)}
    for start in range(0, len(requests), BULK_LIMIT):
        part = requests[start : start + BULK_LIMIT]
        ids = [request.id for request in part]
        body |= {"flow_runs": {"id": {"any_": ids}}, "force": False, "limit": len(ids)}
        try:
            response = await ctx.client.request("POST", "/flow_runs/bulk_set_state", json=body)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code not in (404, 405):
                raise
            got = await asyncio.gather(*(propose(ctx, request, state) for request in part))
            ended |= {request.id: now for request, now in zip(part, got)}
            continue
        for result in response.json()["results"]:
            now = (result.get("state") or {}).get("type")
            accepted = result["status"] == SetStateStatus.ACCEPT.value
            ended[result["flow_run_id"]] = state.type if accepted else now and StateType(now)
    cancelling = [r for r in requests if ended.get(r.id) is StateType.CANCELLING]
    cancelled = Cancelled(message="cancelled before its result was ready")
    for request, now in zip(
        cancelling, await asyncio.gather(*(propose(ctx, r, cancelled) for r in cancelling))
    ):
        ended[request.id] = now
    return ended


def _summary(
    request: Request, state: str, message: str, result: StructureResult | None, work_dir: str
) -> RunSummary:
    """Return the ``run.json`` of ``request``: its inputs, how it ended, its result."""
    raw = request.run.parameters or {}
    return RunSummary(
        flow_run_id=request.id,
        flow_name=REQUEST_FLOW,
        state=state,
        message=message,
        engine=request.params.engine if request.params else "",
        parameters=(
            request.params.model_dump(mode="json")
            if request.params
            else dict(raw.get("parameters") or {})
        ),
        source=(
            request.source.model_dump(mode="json")
            if request.source
            else dict(raw.get("source") or {})
        ),
        n_structures=1 if result else 0,
        n_completed=int(bool(result and result.ok)),
        result_ids=[result.id] if result else [],
        work_dir=work_dir,
        started_at=datetime.fromtimestamp(request.claimed_at, timezone.utc),
        finished_at=datetime.now(timezone.utc),
    )


async def _end(
    ctx: Context, request: Request, summary: RunSummary, state: State, stored: bool = False
) -> StateType | None:
    """Store ``summary`` as the request's ``run.json`` (unless ``stored``), then propose
    ``state``; return the state the request ended in. A request someone cancelled
    meanwhile ends Cancelled, and its ``run.json`` says so."""
    root = get_settings().resolved_results_root()
    if not stored:
        await asyncio.to_thread(save_run, root, summary)
    ended = await propose(ctx, request, state)
    if ended is StateType.CANCELLED and state.type is not StateType.CANCELLED:
        cancelled = summary.model_copy(update={"state": "Cancelled", "message": "cancelled"})
        await asyncio.to_thread(save_run, root, cancelled)
    return ended


async def fail_request(ctx: Context, request: Request, message: str) -> StateType | None:
    """End ``request`` Failed with ``message`` (one line), recording it in the store
    (``run.json``, no structure document, as ``simulate`` does for bad input); return
    the state it ended in."""
    flow_run_logger(request.run).error("%s", message)
    summary = _summary(request, "Failed", message, None, "")
    return await _end(ctx, request, summary, Failed(message=message))


def request_document(request: Request, computed: StructureResult) -> StructureResult:
    """Return the result document of ``request``: the batch's document ``computed`` under
    the request's own run, named as its structure was, ``reused_from`` naming it."""
    assert request.structure is not None
    name = request.structure.name
    return computed.model_copy(
        update={
            "id": f"00000-{name}",
            "flow_run_id": request.id,
            "flow_name": REQUEST_FLOW,
            "index": 0,
            "name": name,
            "input_structure": to_extxyz(request.structure.atoms),
            "reused_from": computed.ref,
            "parent_id": request.structure.parent_id,
            "workflow_run_id": None,
            "step": None,
            "created_at": datetime.now(timezone.utc),
        }
    )


def _markdown(document: StructureResult, path: Path, batch: FlowRun, computed: str) -> str:
    """Return the request's artifact: its outcome, its document, the batch that computed it."""
    lines = [f"# {REQUEST_FLOW} (batched): {document.name}", ""]
    if document.ok and document.energy_eV is not None:
        gap = f", gap {document.gap_eV:.4f} eV" if document.gap_eV is not None else ""
        lines.append(
            f"**completed**: E = {document.energy_eV:.6f} eV "
            f"({document.energy_hartree:.8f} Ha){gap}"
        )
    else:
        lines.append(f"**{document.status}**: {document.message}")
    link = url_for("flow-run", obj_id=batch.id)
    shown = f"[{batch.name}]({link})" if link else f"`{batch.name}`"
    lines += [
        "",
        f"Result `{document.ref}`: `{path}` (`atomforge show {document.ref}`)",
        "",
        f"Computed in batch run {shown} (`{batch.id}`) as structure `{computed}`.",
    ]
    return "\n".join(lines)


async def _end_without_result(
    ctx: Context, request: Request, batch: Batch, ending: State
) -> StateType | None:
    """End ``request``, which its batch (ended as ``ending`` says) did not compute:
    Cancelled if the batch was cancelled, else Crashed or Failed as the batch ended;
    return the state it ended in."""
    if batch.cancelled or ending.is_cancelled() or ending.is_cancelling():
        name, message = "Cancelled", f"its batch {batch.run.id} was cancelled"
        state: State = Cancelled(message=message)
    else:
        name = "Crashed" if ending.is_crashed() else "Failed"
        said = f": {ending.message}" if ending.message else ""
        message = f"its batch {batch.run.id} ended {ending.name} without its result{said}"
        state = Crashed(message=message) if ending.is_crashed() else Failed(message=message)
    flow_run_logger(request.run).error("%s", message)
    summary = _summary(request, name, message, None, str(batch.paths.work_dir))
    return await _end(ctx, request, summary, state)


async def finish_request(
    ctx: Context, request: Request, batch: Batch, computed: StructureResult | None, ending: State
) -> StateType | None:
    """Give ``request`` its document, result, artifact and final state from the batch's
    document ``computed`` (None: the batch ended, as ``ending`` says, before it had one);
    return the state the request ended in."""
    if computed is None or (batch.cancelled and not computed.ok):
        return await _end_without_result(ctx, request, batch, ending)
    document = request_document(request, computed)
    root = get_settings().resolved_results_root()
    state_name = "Completed" if document.ok else "Failed"
    message = "" if document.ok else f"{document.name}: {document.status}: {document.message}"
    summary = _summary(request, state_name, message, document, str(batch.paths.work_dir))

    def store() -> Path:
        save_run(root, summary)
        return save_result(root, document)

    path = await asyncio.to_thread(store)
    markdown = _markdown(document, path, batch.run, request.batch_name)
    artifact = ArtifactCreate(
        type="markdown",
        data=markdown,
        description=f"Result of a batched {REQUEST_FLOW} request",
        flow_run_id=request.run.id,
    )
    await ctx.limited(ctx.client.create_artifact(artifact))
    logger = flow_run_logger(request.run)
    logger.info("computed in batch run %r (%s); result %s", batch.run.name, batch.run.id, path)
    if not document.ok:
        logger.error("%s", message)
        return await _end(ctx, request, summary, Failed(message=message), stored=True)
    record = ctx.result_store.create_result_record(document)
    await ctx.result_store.apersist_result_record(record)
    return await _end(ctx, request, summary, Completed(data=record), stored=True)


def batch_parameters(requests: list[Request]) -> dict[str, Any]:
    """Return the parameters of the ``screen`` run of ``requests`` (one group)."""
    first = requests[0]
    assert first.params is not None
    return {
        "source": batch_source(requests),
        "parameters": first.params,
        "options": batch_options(first),
        "rank_by": "energy_per_atom",
    }


def _as_json(parameters: dict[str, Any]) -> dict[str, Any]:
    """Return flow parameters as JSON values, for the API."""
    return {
        key: value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        for key, value in parameters.items()
    }


async def _start_requests(
    ctx: Context, requests: list[Request], batch: FlowRun
) -> tuple[list[Request], dict[str, StateType | None]]:
    """Move ``requests`` to Running, naming the batch; return those that are Running, and
    the state each of the others is in: cancelled meanwhile (they end Cancelled), or,
    when the server made them wait (a concurrency limit on the deployment), Scheduled
    again."""
    running = Running(message=f"in batch {batch.id} ({ctx.owner})")
    ended = await propose_many(ctx, requests, running)
    stopped = {StateType.RUNNING, *FINAL}
    waiting = [r for r in requests if ended.get(r.id) not in stopped]
    if waiting:
        again = Scheduled(message="the server did not let it start: scheduled again")
        ended |= await propose_many(ctx, waiting, again)
    started = [r for r in requests if ended.get(r.id) is StateType.RUNNING]
    return started, {r.id: ended.get(r.id) for r in requests if r not in started}


async def _run_batch(ctx: Context, batch: Batch, parameters: dict[str, Any]) -> State:
    """Run the batch's flow in this process; return its final state (a crash of the
    flow's engine becomes a Crashed state)."""
    ctx.batches[batch.run.id] = batch
    try:
        return await run_flow_async(
            ctx.batch_flow, flow_run=batch.run, parameters=parameters, return_type="state"
        )
    except Exception as exc:  # the requests still end, saying how the batch ended
        return Crashed(message=one_line(exc))
    finally:
        ctx.batches.pop(batch.run.id, None)


async def _settle_batch(ctx: Context, batch: Batch, state: State) -> State:
    """Return the batch run's final state, given the one its flow ended in: a cancelled
    run (its engines were stopped when the cancel was seen) is made Cancelled, after the
    flow's cancellation hooks ran (the flow's engine runs them when its last state
    change finds the run Cancelling; here they run when it did not get that far)."""
    current = (await ctx.client.read_flow_run(batch.run.id)).state or state
    if current.type not in (StateType.CANCELLING, StateType.CANCELLED):
        return state
    batch.cancelled = True
    if not state.is_cancelling():
        for hook in ctx.batch_flow.on_cancellation_hooks:
            await asyncio.to_thread(hook, ctx.batch_flow, batch.run, current)
    if current.type is StateType.CANCELLING:
        current = Cancelled(message=current.message or "cancelled")
        await ctx.client.set_flow_run_state(batch.run.id, current)
    return current


def stop_batch(batch: Batch) -> None:
    """Stop the engines of a batch whose run was cancelled (its structures end
    ``stopped`` or ``not-started``; the flow then ends by itself)."""
    batch.cancelled = True
    stop_run_engines(batch.paths)


async def run_group(ctx: Context, requests: list[Request]) -> dict[str, StateType | None]:
    """Compute ``requests`` (one group, each prepared) in one batch run and end each of
    them; return the state each request ended in, by request id."""
    began = time.monotonic()
    unique_names(requests)
    parameters = batch_parameters(requests)
    first = requests[0]
    assert first.params is not None
    title = f"{first.params.engine} {first.params.kind.value}"
    name = f"batch of {len(requests)} {REQUEST_FLOW} requests: {title}"
    run = await ctx.client.create_flow_run(
        ctx.batch_flow,
        name=name,
        parameters=_as_json(parameters),
        tags=list(BATCH_TAGS),
        state=Pending(message=ctx.owner),
    )
    running, ended = await _start_requests(ctx, requests, run)
    if not running:
        message = "every request was cancelled before it ran"
        await ctx.client.set_flow_run_state(run.id, Cancelled(message=message))
        return ended
    if len(running) < len(requests):
        parameters = batch_parameters(running)
        run.name = f"batch of {len(running)} {REQUEST_FLOW} requests: {title}"
        await ctx.client.update_flow_run(run.id, name=run.name, parameters=_as_json(parameters))
    batch = Batch(run, run_paths(get_settings(), str(run.id)))
    started = time.monotonic()
    state = await _settle_batch(ctx, batch, await _run_batch(ctx, batch, parameters))
    computed_at = time.monotonic()
    computed = {
        result.name: result
        for result in await asyncio.to_thread(
            lambda: list(iter_results(get_settings().resolved_results_root(), str(run.id)))
        )
    }
    finals = await asyncio.gather(
        *(finish_request(ctx, r, batch, computed.get(r.batch_name), state) for r in running),
        return_exceptions=True,
    )
    for request, final in zip(running, finals):
        if isinstance(final, BaseException):
            why = f"the batcher could not end it: {one_line(final)}"
            print(f"request {request.id}: {why}", flush=True)
            final = await propose(ctx, request, Crashed(message=why))
        ended[request.id] = final
    print(
        f"batch {run.id}: {len(running)} request(s), {state.name}; starting "
        f"{started - began:.2f} s, the flow {computed_at - started:.2f} s, ending the "
        f"requests {time.monotonic() - computed_at:.2f} s",
        flush=True,
    )
    return ended
