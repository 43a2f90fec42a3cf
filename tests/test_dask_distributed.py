"""The distributed path: a separately started `dask scheduler` and `dask worker` on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
from distributed import Client
from prefect import flow
from prefect.context import FlowRunContext

from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.scheduling.dask_runner import (
    InProcessDaskTaskRunner,
    SettingsDaskTaskRunner,
    dask_task_runner,
)
from atomforge.flows.screen import screen
from atomforge.flows.settings import Settings
from tests.conftest import REPO

DASK = str(Path(sys.executable).with_name("dask"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dask(*args: str) -> subprocess.Popen:
    """Start the ``dask`` command with ``args`` from the repository, output discarded."""
    return subprocess.Popen(
        [DASK, *args],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def dask_cluster(start_workers: Callable[[str], subprocess.Popen], n_workers: int):
    """Start a `dask scheduler` on loopback and the workers ``start_workers(address)``
    starts; yield the address once ``n_workers`` joined; stop them all."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        _dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0")
    ]
    try:
        procs.append(start_workers(address))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture
def scheduler_address():
    """Start a Dask scheduler and two worker processes; return the scheduler address."""

    def two_workers(address: str) -> subprocess.Popen:
        return _dask(
            *("worker", address, "--nworkers", "2", "--nthreads", "1"),
            *("--name", "loopback-worker", "--no-dashboard"),
        )

    with dask_cluster(two_workers, 2) as address:
        yield address


def test_screen_runs_on_an_existing_dask_scheduler(scheduler_address):
    from ase.build import molecule

    from atomforge.engines.structures import to_extxyz

    text = "".join(to_extxyz(molecule(n)) for n in ("H2O", "NH3", "CH4", "HF"))
    runner = dask_task_runner(Settings(dask_address=scheduler_address))
    on_cluster = screen.with_options(task_runner=runner)
    report = asyncio.run(
        on_cluster(StructureSource(text=text), make_parameters(engine="xtb", kind="singlepoint"))
    )
    assert report.n_completed == 4
    with Client(scheduler_address) as client:
        seen = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        worker_pids = set(client.run(os.getpid).values())
    assert any("run_engine" in p or "run-engine" in p for p in seen), seen
    assert os.getpid() not in worker_pids


def test_local_cluster_is_the_default_and_hpc_clusters_are_configurable():
    local = dask_task_runner(Settings(dask_workers=3))
    assert local.address is None
    assert (local.cluster_kwargs["n_workers"], local.cluster_kwargs["threads_per_worker"]) == (1, 3)
    assert local.cluster_kwargs["resources"] == {"cores": 3}
    processes = dask_task_runner(Settings(dask_workers=3, dask_processes=True))
    assert (processes.cluster_kwargs["n_workers"], processes.cluster_kwargs["resources"]) == (
        3,
        {"cores": 1},
    )
    slurm = dask_task_runner(
        Settings(
            dask_cluster_class="dask_jobqueue.SLURMCluster",
            dask_cluster_kwargs={"cores": 4, "memory": "8GB"},
            dask_adapt_max=10,
        )
    )
    from prefect.utilities.importtools import from_qualified_name

    assert from_qualified_name(slurm.cluster_class).__name__ == "SLURMCluster"
    assert (slurm.cluster_kwargs["cores"], slurm.cluster_kwargs["memory"]) == (4, "8GB")
    assert slurm.adapt_kwargs == {"minimum": 0, "maximum": 10}
    pbs = dask_task_runner(
        Settings(dask_cluster_class="dask_jobqueue.PBSCluster", dask_cluster_kwargs={"cores": 2})
    )
    assert pbs.cluster_kwargs == {"cores": 2}


def _runner_seen() -> tuple[type, str]:
    """Return the current flow run's task runner class and its scheduler's address."""
    runner = FlowRunContext.get().task_runner
    return type(runner), runner.client.scheduler.address


@flow(task_runner=SettingsDaskTaskRunner())
def _step() -> tuple[type, str]:
    return _runner_seen()


@flow(task_runner=SettingsDaskTaskRunner())
def _chain() -> tuple[tuple[type, str], tuple[type, str]]:
    return _runner_seen(), _step()


def test_a_subflow_runs_on_its_parents_in_process_cluster_with_the_in_process_runner():
    (parent, parent_address), (step, step_address) = _chain()
    assert parent is step is InProcessDaskTaskRunner
    assert step_address == parent_address


@pytest.fixture
def worker_without_the_work_root():
    """Start a scheduler and a worker that sees an empty folder over the work root (a
    private tmpfs mount): a worker host that does not share the flow's file system."""
    work_root = Settings().resolved_work_root()

    def blind_worker(address: str) -> subprocess.Popen:
        worker = f"mount -t tmpfs none {work_root} && exec {DASK} worker {address} --nthreads 1"
        return subprocess.Popen(["unshare", "-m", "sh", "-c", worker], cwd=REPO)

    with dask_cluster(blind_worker, 1) as address:
        yield address


def test_a_worker_that_does_not_share_the_work_root_is_refused_before_any_engine(
    worker_without_the_work_root,
):
    from ase.build import molecule

    from atomforge.engines.errors import InputError
    from atomforge.engines.structures import to_extxyz

    runner = dask_task_runner(Settings(dask_address=worker_without_the_work_root))
    on_cluster = screen.with_options(task_runner=runner)
    params = make_parameters(engine="xtb", kind="singlepoint")
    with pytest.raises(InputError, match="is not shared with Dask worker"):
        asyncio.run(on_cluster(StructureSource(text=to_extxyz(molecule("H2O"))), params))
