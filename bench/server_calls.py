"""Benchmark: what the service's Prefect server spends on each API call a request makes.

Brings the service up as ``request_latency.py`` does (PostgreSQL, the server with auth,
the pool, the consumer, the batcher, the worker; in a temporary folder) and, by default,
stops the consumer, the batcher and the worker (``SIGSTOP``) so that nothing else asks
the server anything, then makes ``--count`` of each call in a row and prints the
server's and PostgreSQL's CPU milliseconds per call: the polls' count of due runs and
their ``get_scheduled_flow_runs``, creating a run of ``simulate/batched`` (no check of
its parameters against the form's schema) and of ``simulate/simulate`` (checked), the
bulk Pending and Running of those runs, a markdown artifact, a log line, a Completed
state, reading a run. The idle server's CPU a second comes first.

With ``--api-calls`` it instead leaves the service running, submits ``--requests``
``simulate`` requests of water (xtb) one at a time, ``--pause`` seconds apart, each
waited for, and prints the API calls the server answered per request, by route (from its
access log: the server then logs at INFO). Run: ``.venv/bin/python bench/server_calls.py
[--count 50]`` or ``.venv/bin/python bench/server_calls.py --api-calls [--requests 5]
[--pause 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from request_latency import WATER, _settle, _submit, service, service_cpu

POLLERS = ("consumer.pid", "batcher.pid", "worker.pid")
ROUTE = re.compile(r'"(GET|POST|PATCH|PUT|DELETE) (\S+) HTTP')
T = TypeVar("T")
RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@contextmanager
def pollers_stopped(service_dir: Path):
    """Stop the service's consumer, batcher and worker while the block runs."""
    pids = [int((service_dir / name).read_text().split()[0]) for name in POLLERS]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def server_ms(before: dict[str, float], after: dict[str, float], n: int) -> str:
    """Return the server's and PostgreSQL's CPU per call between two readings, as text."""
    server = (after["server"] - before["server"]) / n * 1000
    postgres = (after["postgres"] - before["postgres"]) / n * 1000
    return f"server {server:6.1f} ms, PostgreSQL {postgres:5.1f} ms"


async def per_call(count: int, service_dir: Path) -> None:
    """Print the server's CPU per call of each kind, ``count`` of each in a row."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate, LogCreate
    from prefect.deployments import run_deployment
    from prefect.states import Completed, Pending, Running, to_state_create

    parameters = {"source": {"path": str(WATER)}, "parameters": {"engine": "xtb"}}
    now = datetime.now(timezone.utc).isoformat()
    due = {
        "flow_runs": {
            "state": {"type": {"any_": ["SCHEDULED"]}},
            "next_scheduled_start_time": {"before_": now},
        },
        "work_pools": {"name": {"any_": ["atomforge-process"]}},
    }
    async with get_client() as client:

        async def measure(name: str, calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
            """Make ``calls`` in a row; print the server's CPU per run (``count`` runs)."""
            await asyncio.sleep(2)  # what the calls before left to the server's services
            before = service_cpu(service_dir)
            results = [await call() for call in calls]
            print(f"{name:46s} {server_ms(before, service_cpu(service_dir), count)}")
            return results

        before = service_cpu(service_dir)
        await asyncio.sleep(5)
        print(f"{'idle, a second':46s} {server_ms(before, service_cpu(service_dir), 5)}")
        poll = {"limit": 2, "scheduled_before": now}
        scheduled = "/work_pools/atomforge-process/get_scheduled_flow_runs"
        await measure(
            "count of due runs (a poll)",
            [lambda: client.request("POST", "/flow_runs/count", json=due)] * count,
        )
        await measure(
            "get_scheduled_flow_runs (a poll; nothing due)",
            [lambda: client.request("POST", scheduled, json=poll)] * count,
        )
        created = {}
        for deployment in ("simulate/batched", "simulate/simulate"):
            created[deployment] = await measure(
                f"create a run of {deployment}"
                + (" (checked)" if deployment == "simulate/simulate" else ""),
                [
                    lambda d=deployment: run_deployment(
                        d, parameters=parameters, timeout=0, client=client
                    )
                ]
                * count,
            )
        batched = [str(run.id) for run in created["simulate/batched"]]
        for state in (Pending(message="claimed"), Running(message="in a batch")):
            body = {
                "state": to_state_create(state).model_dump(mode="json", serialize_as_any=True),
                "flow_runs": {"id": {"any_": batched}},
                "limit": count,
            }
            await measure(
                f"its share of one bulk {state.name} of {count}",
                [lambda body=body: client.request("POST", "/flow_runs/bulk_set_state", json=body)],
            )
        await measure(
            "a markdown artifact",
            [
                lambda run_id=run_id: client.create_artifact(
                    ArtifactCreate(type="markdown", data="# result\n" * 10, flow_run_id=run_id)
                )
                for run_id in batched
            ],
        )
        await measure(
            "a log line",
            [
                lambda run_id=run_id: client.create_logs(
                    [
                        LogCreate(
                            name="bench",
                            level=20,
                            message="computed",
                            timestamp=datetime.now(timezone.utc),
                            flow_run_id=run_id,
                        ).model_dump(mode="json")
                    ]
                )
                for run_id in batched
            ],
        )
        await measure(
            "a Completed state",
            [
                lambda run_id=run_id: client.set_flow_run_state(run_id, Completed())
                for run_id in batched
            ],
        )
        await measure(
            "reading a run",
            [lambda run_id=run_id: client.read_flow_run(run_id) for run_id in batched],
        )


async def api_calls(requests: int, pause: float, service_dir: Path) -> None:
    """Print the API calls the server answered per ``simulate`` request, by route, for
    ``requests`` requests one at a time, ``pause`` seconds apart."""
    from prefect.client.orchestration import get_client

    log = service_dir / "server.log"
    async with get_client() as client:
        await _settle(client, [await _submit(client, {}, "xtb")], poll=0.1)  # warm-up
        await asyncio.sleep(pause)
        first = len(log.read_text().splitlines())
        for _ in range(requests):
            await _settle(client, [await _submit(client, {}, "xtb")], poll=0.1)
            await asyncio.sleep(pause)
    routes: Counter[str] = Counter()
    for line in log.read_text().splitlines()[first:]:
        if found := ROUTE.search(line):
            path = RUN_ID.sub("ID", found.group(2).split("?")[0])
            routes[f"{found.group(1)} {path}"] += 1
    print(f"API calls per request ({requests} requests, {pause:g} s apart, each waited for):")
    for route, calls in routes.most_common():
        print(f"  {calls / requests:6.1f}  {route}")
    print("(this benchmark's own reads of each request are among them: POST /flow_runs/filter")
    print(" every 0.1 s until it is final, GET /flow_run_states/)")


def main() -> None:
    """Bring the service up, measure, print; bring it down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="calls of each kind")
    parser.add_argument("--api-calls", action="store_true", help="count calls per request")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between requests")
    args = parser.parse_args()
    if args.api_calls:
        os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"  # its access log
    with service() as env:
        os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")})
        os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
        service_dir = Path(env["ATOMFORGE_SERVICE_DIR"])
        if args.api_calls:
            asyncio.run(api_calls(args.requests, args.pause, service_dir))
            return
        with pollers_stopped(service_dir):
            asyncio.run(per_call(args.count, service_dir))


if __name__ == "__main__":
    sys.exit(main())
