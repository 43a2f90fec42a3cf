"""Benchmark: what Prefect and Dask alone cost for the shape of an atomforge run.

Runs, on the embedded Prefect API and the same ``DaskTaskRunner`` atomforge builds, an
empty async flow and a flow of no-op tasks shaped like a run (validate, prepare-inputs
and parse-results in the flow's process, one run-engine task per worker on Dask), and
prints their median wall times. The difference between ``bench/g2_screen.py --limit 2``
and the second figure is what atomforge itself adds per run; each figure comes with the CPU
time the flow's process spent on it. Then prints the CPU time
the Prefect server spends on each thing a run asks of it, from ``--count`` of each in a
row: a flow run (an empty flow), a task run, a keyed markdown artifact created, an
artifact updated in place, a log line. Run:
``.venv/bin/python bench/prefect_floor.py [--workers N] [--repeat R] [--count N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from statistics import median

SETTLE_SECONDS = 2.0


def main() -> None:
    """Time both flows ``--repeat`` times, alternating, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=9, help="rounds; medians are reported")
    parser.add_argument("--count", type=int, default=40, help="of each server cost measured")
    args = parser.parse_args()
    os.environ["ATOMFORGE_DASK_WORKERS"] = str(args.workers)

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from atomforge.flows.scheduling.dask_runner import dask_task_runner

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def in_flow_step(value: int) -> int:
        return value

    @task(cache_policy=NO_CACHE, persist_result=False)
    def on_dask_step(value: int) -> int:
        return value

    options = {"task_runner": dask_task_runner(), "persist_result": True}

    @flow(name="empty", result_serializer="json", **options)
    async def empty() -> int:
        return 0

    @flow(name="run-shaped", result_serializer="json", **options)
    async def run_shaped() -> int:
        await in_flow_step(0)
        await in_flow_step(1)
        engine_runs = [on_dask_step.submit(worker) for worker in range(args.workers)]
        await in_flow_step(sum(engine_run.result() for engine_run in engine_runs))
        return 0

    flows = {"empty async flow": empty, "run-shaped flow of no-op tasks": run_shaped}
    asyncio.run(run_shaped())  # warm-up: starts the embedded API
    times: dict[str, list[float]] = {name: [] for name in flows}
    cpu: dict[str, list[float]] = {name: [] for name in flows}
    for _ in range(args.repeat):
        for name, timed_flow in flows.items():
            started, cpu_before = time.perf_counter(), process_cpu()
            asyncio.run(timed_flow())
            times[name].append(time.perf_counter() - started)
            cpu[name].append(process_cpu() - cpu_before)
    print(f"{args.workers} Dask worker(s), median of {args.repeat} rounds (min in brackets)")
    for name, seconds in times.items():
        print(
            f"{name:32s} {median(seconds):6.3f} s [{min(seconds):.3f}], "
            f"the flow's process {median(cpu[name]):.3f} CPU s"
        )
    print_server_costs(empty, args.count)


def process_cpu() -> float:
    """Return the CPU seconds (user and system) this process has used so far."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def server_cpu() -> float:
    """Return the CPU seconds used so far by the embedded Prefect server under this process."""
    import psutil

    used = 0.0
    for child in psutil.Process().children(recursive=True):
        if "uvicorn" in " ".join(child.cmdline()):
            times = child.cpu_times()
            used += times.user + times.system
    return used


def print_server_costs(empty_flow: Callable[[], Awaitable[int]], count: int) -> None:
    """Print the server's CPU milliseconds for each kind of thing a run asks of it, each
    measured over ``count`` in a row, less the server's idle CPU over as long and, for the
    things made inside a flow run, less that flow run (the first figure)."""
    from prefect import flow, get_client, get_run_logger, task
    from prefect.artifacts import acreate_markdown_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.client.schemas.actions import ArtifactUpdate

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def no_op(value: int) -> int:
        return value

    @flow(name="server-costs")
    async def costs(kind: str) -> None:
        if kind == "task run":
            for index in range(count):
                await no_op(index)
        elif kind == "artifact created":
            for index in range(count):
                await acreate_markdown_artifact(f"# {index}\n", key=f"cost-{index % 2}")
        elif kind == "artifact updated":
            made = await acreate_markdown_artifact("# 0\n", key="cost-update")
            async with get_client() as client:
                for index in range(count):
                    update = ArtifactUpdate(data=f"# {index}\n")
                    await client.update_artifact(artifact_id=made, artifact=update)
        elif kind == "log line":
            for index in range(count):
                get_run_logger().info("structure %d done", index)

    async def flow_runs(kind: str) -> None:
        for _ in range(count):
            await empty_flow()

    before = server_cpu()
    time.sleep(SETTLE_SECONDS)
    idle = (server_cpu() - before) / SETTLE_SECONDS
    print(f"Prefect server CPU, each (the mean of {count} in a row, less its idle CPU):")
    kinds = {"flow run": flow_runs, "task run": costs, "artifact created": costs}
    kinds |= {"artifact updated": costs, "log line": costs}
    per_flow_run = 0.0
    for kind, run in kinds.items():
        before, started = server_cpu(), time.perf_counter()
        asyncio.run(run(kind))
        time.sleep(SETTLE_SECONDS)  # the server records events and logs after the calls
        spent = server_cpu() - before - idle * (time.perf_counter() - started)
        each = spent / count if run is flow_runs else (spent - per_flow_run) / count
        per_flow_run = per_flow_run or each
        print(f"  {kind:18s} {each * 1000:6.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
