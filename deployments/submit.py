"""Submit a run of a deployment at a priority: ``atomforge submit DEPLOYMENT --priority P``.

The priority names a queue of the service's pool (see :mod:`atomforge.deployments.service`):
``urgent``, ``normal`` (the ``default`` queue) or ``batch``; the worker takes the most
urgent waiting run whenever a slot frees. ``atomforge submit simulate/batched`` submits a
request that the batcher computes together with others (see
:mod:`atomforge.deployments.batcher`); ``--wait`` then waits for that request's own state.
"""

from __future__ import annotations

import asyncio
import json

from atomforge.deployments.service import PRIORITIES

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POLL_SECONDS = 1.0


def parse_params(pairs: list[str]) -> dict[str, object]:
    """Return ``key=JSON`` pairs as parameters (a value that is not JSON is a string).

    Raises ValueError for a pair without ``=``.
    """
    params: dict[str, object] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--param {pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


async def submit(
    deployment: str, priority: str, params: dict[str, object], wait: bool
) -> tuple[str, str | None]:
    """Submit a run of ``deployment`` to the queue of ``priority``; return its id and, with
    ``wait``, the type of its final state (None without)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    queue = PRIORITIES[priority]
    run = await run_deployment(deployment, parameters=params, work_queue_name=queue, timeout=0)
    print(f"submitted {run.id} ({run.name}) to queue {queue}", flush=True)
    if not wait:
        return str(run.id), None
    async with get_client() as client:
        while True:
            state = (await client.read_flow_run(run.id)).state
            if state is not None and state.type.value in FINAL:
                print(f"{run.id}: {state.name}" + (f": {state.message}" if state.message else ""))
                return str(run.id), state.type.value
            await asyncio.sleep(POLL_SECONDS)


def submit_command(deployment: str, priority: str, pairs: list[str], wait: bool) -> int:
    """Run ``atomforge submit``; return its exit code (1 if a waited-for run did not complete)."""
    _, final = asyncio.run(submit(deployment, priority, parse_params(pairs), wait))
    return 0 if final in {None, "COMPLETED"} else 1
