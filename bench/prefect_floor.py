"""Benchmark: what Prefect and Dask alone cost for the shape of an atomforge run.

Runs, on the embedded Prefect API and the same ``DaskTaskRunner`` atomforge builds, an
empty async flow and a flow of no-op tasks shaped like a run (validate, prepare-inputs
and parse-results in the flow's process, one run-engine task per worker on Dask), and
prints their median wall times. The difference between ``bench/g2_screen.py --limit 2``
and the second figure is what atomforge itself adds per run. Run:
``.venv/bin/python bench/prefect_floor.py [--workers N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from statistics import median


def main() -> None:
    """Time both flows ``--repeat`` times, alternating, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=9, help="rounds; medians are reported")
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
    for _ in range(args.repeat):
        for name, timed_flow in flows.items():
            started = time.perf_counter()
            asyncio.run(timed_flow())
            times[name].append(time.perf_counter() - started)
    print(f"{args.workers} Dask worker(s), median of {args.repeat} rounds (min in brackets)")
    for name, seconds in times.items():
        print(f"{name:32s} {median(seconds):6.3f} s [{min(seconds):.3f}]")


if __name__ == "__main__":
    sys.exit(main())
