"""Build the Dask task runner from settings: local cluster, existing scheduler, or HPC cluster."""

from __future__ import annotations

import logging
from typing import Any

import dask
from prefect.task_runners import TaskRunner
from prefect_dask import DaskTaskRunner

from atomforge.flows.settings import Settings, get_settings

logging.getLogger("distributed").setLevel(logging.WARNING)


def dask_task_runner(settings: Settings | None = None) -> DaskTaskRunner:
    """Return a DaskTaskRunner as configured.

    ``ATOMFORGE_DASK_ADDRESS`` connects to a running scheduler; ``ATOMFORGE_DASK_CLUSTER_CLASS``
    (e.g. ``dask_jobqueue.SLURMCluster``) with ``ATOMFORGE_DASK_CLUSTER_KWARGS`` starts one;
    otherwise a ``LocalCluster`` with ``ATOMFORGE_DASK_WORKERS`` single-threaded workers.
    """
    settings = settings or get_settings()
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    adapt = {"maximum": settings.dask_adapt_max} if settings.dask_adapt_max else None
    if settings.dask_cluster_class:
        return DaskTaskRunner(
            cluster_class=settings.dask_cluster_class,
            cluster_kwargs=settings.dask_cluster_kwargs,
            adapt_kwargs=adapt,
        )
    dask.config.set({"distributed.worker.profile.enabled": settings.dask_profile})
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": settings.dask_workers,
            "threads_per_worker": 1,
            "processes": settings.dask_processes,
            "dashboard_address": None,
            **settings.dask_cluster_kwargs,
        },
        adapt_kwargs=adapt,
    )


def parallel_slots(task_runner: TaskRunner | None, settings: Settings) -> int:
    """Return how many tasks can run at once: Dask worker threads, or the configured count.

    An adaptive cluster counts its maximum size; a cluster with no workers yet (an HPC
    queue still pending) counts ``ATOMFORGE_DASK_WORKERS``.
    """
    if settings.dask_adapt_max:
        return settings.dask_adapt_max
    if isinstance(task_runner, DaskTaskRunner):
        threads = sum(task_runner.client.nthreads().values())
        if threads:
            return threads
    return settings.dask_workers


def simulation_flow_options() -> dict[str, Any]:
    """Return the options every atomforge flow shares: Dask runner, stop hooks, JSON results."""
    from atomforge.flows.hooks import stop_engines

    return {
        "task_runner": dask_task_runner(),
        "on_cancellation": [stop_engines],
        "on_crashed": [stop_engines],
        "persist_result": True,
        "result_serializer": "json",
    }
