"""Build the Dask task runner from settings: local cluster, existing scheduler, or HPC cluster."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any
from uuid import uuid4

import dask
import distributed
import prefect.context
from distributed import Client, get_worker
from prefect.client.schemas.objects import RunInput
from prefect.context import (
    AssetContext,
    EngineContext,
    FlowRunContext,
    SettingsContext,
    TagsContext,
    TaskRunContext,
    serialize_context,
)
from prefect.task_engine import run_task_async, run_task_sync
from prefect.task_runners import TaskRunner
from prefect.tasks import Task
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from atomforge.engines.errors import InputError
from atomforge.flows.scheduling import slurm
from atomforge.flows.settings import Settings, get_settings

QUIET_LOCAL_CLUSTER = {
    "distributed.scheduler.work-stealing": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}
"""Dask's periodic work in the flow's process, made rarer: each run-engine task is one
long chunk that atomforge balances itself (claims, take-over), so work stealing has
nothing to do, and every millisecond of CPU the scheduler's loop spends is taken from
the engines on a small machine."""
CORES = "cores"
"""The Dask worker resource that counts cores: an N-core engine task takes N of them."""

logging.getLogger("distributed").setLevel(logging.WARNING)


def dask_task_runner(settings: Settings | None = None) -> DaskTaskRunner:
    """Return a DaskTaskRunner as configured.

    ``ATOMFORGE_DASK_ADDRESS`` connects to a running scheduler; ``ATOMFORGE_DASK_CLUSTER_CLASS``
    (e.g. ``dask_jobqueue.PBSCluster``) with ``ATOMFORGE_DASK_CLUSTER_KWARGS`` starts one, and
    ``dask_jobqueue.SLURMCluster`` one whose jobs the ``ATOMFORGE_SLURM_*`` settings describe
    (see :mod:`atomforge.flows.scheduling.slurm`);
    otherwise a ``LocalCluster`` with ``ATOMFORGE_DASK_WORKERS`` cores: one worker with a
    thread and a ``cores`` resource unit per core (a worker process per core with
    ``ATOMFORGE_DASK_PROCESSES``), so that a 2-core engine task takes two of them.
    """
    settings = settings or get_settings()
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    if slurm.is_slurm(settings):
        return SlurmTaskRunner(settings)
    adapt = {"maximum": settings.dask_adapt_max} if settings.dask_adapt_max else None
    if settings.dask_cluster_class:
        return DaskTaskRunner(
            cluster_class=settings.dask_cluster_class,
            cluster_kwargs=settings.dask_cluster_kwargs,
            adapt_kwargs=adapt,
        )
    dask.config.set(
        {
            "distributed.worker.profile.enabled": settings.dask_profile,
            **QUIET_LOCAL_CLUSTER,
        }
    )
    per_worker = 1 if settings.dask_processes else settings.dask_workers
    runner_class = InProcessDaskTaskRunner if runs_chunks_here(settings) else DaskTaskRunner
    return runner_class(
        cluster_kwargs={
            "n_workers": settings.dask_workers // per_worker,
            "threads_per_worker": per_worker,
            "resources": {CORES: per_worker},
            "processes": settings.dask_processes,
            "dashboard_address": None,
            **settings.dask_cluster_kwargs,
        },
        adapt_kwargs=adapt,
    )


def runs_chunks_here(settings: Settings) -> bool:
    """Return whether a run's run-engine tasks go to worker threads of its own process (the
    default ``LocalCluster``), not to an existing scheduler, an HPC cluster or worker
    processes."""
    external = settings.dask_address or settings.dask_cluster_class or slurm.is_slurm(settings)
    processes = settings.dask_cluster_kwargs.get("processes", settings.dask_processes)
    return not external and not processes


def task_context(asset: dict[str, Any]) -> dict[str, Any]:
    """Return the context a task submitted to a worker thread of this process runs in:
    what Prefect's ``serialize_context`` returns (``asset`` makes its asset context), but
    without Prefect's settings when the flow run's are the process's own, which the
    worker thread then uses. Serializing them took about 25 ms of CPU a task in the flow,
    and rebuilding them on the worker about 70 ms."""
    if SettingsContext.get() is not prefect.context.GLOBAL_SETTINGS_CONTEXT:
        return serialize_context(asset_ctx_kwargs=asset)
    flow_run_context = EngineContext.get()
    task_run_context = TaskRunContext.get()
    tags_context = TagsContext.get()
    deployment_id = prefect.context._deployment_id.get()
    return {
        "flow_run_context": flow_run_context.serialize() if flow_run_context else {},
        "task_run_context": task_run_context.serialize() if task_run_context else {},
        "tags_context": tags_context.serialize() if tags_context else {},
        "settings_context": {},
        "asset_context": AssetContext.from_task_and_inputs(**asset).serialize(),
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": prefect.context._deployment_parameters.get(),
    }


class InProcessDaskTaskRunner(DaskTaskRunner):
    """A Dask task runner on a ``LocalCluster`` of threads in this process.

    It submits a Prefect task as prefect-dask's client does, less two costs that serve
    only workers in other processes: Prefect's settings travel with a task only when the
    flow run's differ from this process's own (see :func:`task_context`), and each task
    gets a key of its own, so Dask does not tokenize the task and its arguments
    (pickling them) to name it.
    """

    def submit(
        self,
        task: Task,
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectDaskFuture] | None = None,
        dependencies: dict[str, set[RunInput]] | None = None,
    ) -> PrefectDaskFuture:
        """Submit ``task`` with ``parameters`` to the cluster; return its future."""
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        parameters = self._optimize_futures(parameters)
        task_run_id = uuid4()
        inputs = {
            name: collect_task_run_inputs_sync(value, future_cls=distributed.Future)
            for name, value in parameters.items()
        }
        if dependencies:
            inputs = {name: found | dependencies.get(name, set()) for name, found in inputs.items()}
        asset = {
            "task": task,
            "task_run_id": task_run_id,
            "task_inputs": inputs,
            "copy_to_child_ctx": True,
        }

        @wraps(task)
        def run_task(**kwargs: Any) -> Any:
            if task.isasync:
                return asyncio.run(run_task_async(**kwargs))
            return run_task_sync(**kwargs)

        future = distributed.Client.submit(
            self.client,
            run_task,
            key=f"{task.name}-{task_run_id.hex}",
            task=task,
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=self._optimize_futures(wait_for) if wait_for else None,
            dependencies=inputs,
            return_type="state",
            context=task_context(asset),
        )
        return PrefectDaskFuture(wrapped_future=future, task_run_id=task_run_id)

    def workers(self) -> list[dict[str, Any]]:
        """Return what the scheduler says of each worker (``nthreads``, ``resources``): as
        the cluster heard it when its workers started (no call to the scheduler), or, if
        it has not heard of them all yet, as the scheduler answers."""
        client = self.client
        known = [] if self._cluster is None else self._cluster.scheduler_info["workers"]
        if known and len(known) >= self.cluster_kwargs.get("n_workers", 1):
            return list(known.values())
        return list(client.scheduler_info(n_workers=-1)["workers"].values())


class SlurmTaskRunner(DaskTaskRunner):
    """A Dask task runner on a SLURMCluster that submits jobs as structures wait.

    It scales adaptively from no job up to the most jobs the settings allow, and writes
    down which jobs work for which flow run (see :func:`slurm.record_jobs`), so that a
    cancelled or crashed run's hook cancels them.
    """

    def __init__(self, settings: Settings) -> None:
        kwargs = slurm.slurm_cluster_kwargs(settings) | settings.dask_cluster_kwargs
        super().__init__(
            cluster_class=slurm.SLURM_CLUSTER_CLASS,
            cluster_kwargs=kwargs,
            adapt_kwargs={"minimum": 0, "maximum": slurm.max_jobs(settings)},
        )
        self.settings = settings
        self.recorded: set[str] = set()

    @property
    def job_name(self) -> str:
        """Return the name every job of this runner's cluster has."""
        return self.cluster_kwargs["job_name"]

    @property
    def job_cores(self) -> int:
        """Return the cores of each job (one Dask worker)."""
        return int(self.cluster_kwargs["cores"])

    def record_for(self, flow_run_id: str) -> None:
        """Write down, once, that this cluster's jobs work for ``flow_run_id``."""
        if flow_run_id not in self.recorded:
            slurm.record_jobs(self.settings, flow_run_id, self.job_name)
            self.recorded.add(flow_run_id)

    def submit(self, *args: Any, **kwargs: Any):
        """Submit a task (see DaskTaskRunner), first recording the jobs for its flow run."""
        context = FlowRunContext.get()
        if context is not None:
            self.record_for(str(context.flow_run.id))
        return super().submit(*args, **kwargs)

    def duplicate(self) -> SlurmTaskRunner:
        """Return a runner set up like this one, for a new flow run."""
        return SlurmTaskRunner(self.settings)


def cancel_slurm_jobs(flow, flow_run, state) -> None:
    """Cancel the SLURM jobs that worked for ``flow_run`` (a flow state hook)."""
    settings = get_settings()
    if slurm.is_slurm(settings):
        slurm.cancel_recorded_jobs(settings, str(flow_run.id))


def check_shared_work_root(client: Client, work_root: Path) -> None:
    """Return once every Dask worker sees a file just written into ``work_root``.

    The steps hand run-engine tasks paths, and claims and results live in the work
    directories, so the workers must share the work root's file system with the flow.
    Raises InputError naming the workers that do not.
    """
    probe = work_root / f".shared-{secrets.token_hex(6)}"
    probe.touch()
    try:
        seen = client.run(os.path.exists, str(probe))
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted(address for address, exists in seen.items() if not exists)
    if blind:
        raise InputError(
            f"the work root {work_root} is not shared with Dask worker(s) {', '.join(blind)}: "
            "put ATOMFORGE_WORK_ROOT on a file system the flow and every worker mount"
        )


@dataclass(frozen=True)
class EngineSlots:
    """How many structures a run computes at once, and what each engine task asks Dask for."""

    slots: int
    resources: dict[str, int] | None


def engine_slots(task_runner: TaskRunner | None, settings: Settings, cores: int) -> EngineSlots:
    """Return how many ``cores``-core engine tasks fit on the cluster at once.

    Workers that declare a ``cores`` resource (the local cluster does; start others with
    ``dask worker --resources cores=N``) run at most their cores' worth of engine tasks,
    so N-core structures never oversubscribe a machine. Workers that declare none run
    one task per thread, and only 1-core structures. An adaptive cluster counts its
    maximum size; a cluster with no workers yet counts ``ATOMFORGE_DASK_WORKERS``.
    Raises InputError when no worker can ever run a ``cores``-core task, or when the
    workers of a separately started scheduler do not share the work root.
    """
    resources = {CORES: cores}
    if isinstance(task_runner, SlurmTaskRunner):
        if cores > task_runner.job_cores:
            raise InputError(
                f"cores={cores}: each SLURM job has {task_runner.job_cores} core(s) "
                "(set ATOMFORGE_SLURM_CORES)"
            )
        per_job = task_runner.job_cores // cores
        return EngineSlots(slurm.max_jobs(settings) * per_job, resources)
    if settings.dask_adapt_max:
        return EngineSlots(settings.dask_adapt_max, resources if cores > 1 else None)
    workers = []
    if isinstance(task_runner, InProcessDaskTaskRunner):
        workers = task_runner.workers()
    elif isinstance(task_runner, DaskTaskRunner):
        workers = list(task_runner.client.scheduler_info(n_workers=-1)["workers"].values())
        if task_runner.address and workers:
            check_shared_work_root(task_runner.client, settings.resolved_work_root())
    declared = [worker.get("resources", {}).get(CORES) for worker in workers]
    if workers and all(declared):
        if cores > max(declared):
            raise InputError(
                f"cores={cores}: the largest Dask worker has {int(max(declared))} cores"
            )
        return EngineSlots(sum(int(n // cores) for n in declared), resources)
    if cores > 1:
        raise InputError(
            f"cores={cores} needs Dask workers that declare a 'cores' resource "
            "(dask worker --resources cores=N)"
        )
    threads = sum(worker["nthreads"] for worker in workers)
    return EngineSlots(threads or settings.dask_workers, None)


class SettingsDaskTaskRunner(DaskTaskRunner):
    """A Dask task runner set up from the settings when a flow run starts, not at import.

    Prefect gives each flow run a duplicate of its flow's task runner; this one's
    duplicate is :func:`dask_task_runner` as the environment says at that moment; on a
    Dask worker (where Prefect rebuilds a task's flow context) a client of the worker's
    own cluster; for a subflow of a flow that has a Dask runner (a workflow's steps), a
    client of the parent's cluster: the steps share one cluster instead of starting one
    each. Where the parent's cluster is threads of this process, so is the subflow's
    runner (:class:`InProcessDaskTaskRunner`): its tasks skip what only other processes
    need, and its batch engines' runners are prewarmed as a top-level run's are.
    """

    def duplicate(self) -> DaskTaskRunner:
        """Return the parent flow run's cluster as a runner, or the one the settings describe."""
        try:
            return DaskTaskRunner(address=get_worker().scheduler.address)
        except ValueError:
            pass
        parent = FlowRunContext.get()
        if parent is not None and isinstance(parent.task_runner, DaskTaskRunner):
            if isinstance(parent.task_runner, SlurmTaskRunner):
                parent.task_runner.record_for(str(parent.flow_run.id))
            in_process = isinstance(parent.task_runner, InProcessDaskTaskRunner)
            runner_class = InProcessDaskTaskRunner if in_process else DaskTaskRunner
            return runner_class(address=parent.task_runner.client.scheduler.address)
        return dask_task_runner()


def simulation_flow_options() -> dict[str, Any]:
    """Return the options every atomforge flow shares: Dask runner, stop hooks, JSON results,
    run names that say what a run does (and run logs that show atomforge's own errors in
    one line)."""
    from atomforge.flows.hooks import stop_engines
    from atomforge.flows.ui.logs import own_errors_in_one_line
    from atomforge.flows.ui.names import run_name

    own_errors_in_one_line()

    return {
        "task_runner": SettingsDaskTaskRunner(),
        "flow_run_name": run_name,
        "on_cancellation": [stop_engines, cancel_slurm_jobs],
        "on_crashed": [stop_engines, cancel_slurm_jobs],
        "persist_result": True,
        "result_serializer": "json",
    }
