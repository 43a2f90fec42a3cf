"""Engines in SLURM jobs: the dask-jobqueue ``SLURMCluster`` atomforge starts, and its job script.

With ``ATOMFORGE_DASK_CLUSTER_CLASS=dask_jobqueue.SLURMCluster`` each run starts a Dask
scheduler in its own process (on the login node) and submits SLURM jobs, each one Dask
worker with ``ATOMFORGE_SLURM_CORES`` cores, as structures wait; the jobs end with the run.
The settings below (``ATOMFORGE_SLURM_*``) make the job script; ``ATOMFORGE_DASK_CLUSTER_KWARGS``
can still set any SLURMCluster argument, and wins.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atomforge.flows.settings import Settings

SLURM_CLUSTER_CLASS = "dask_jobqueue.SLURMCluster"
JOB_NAME_PREFIX = "atomforge-"
NOT_EXPORTED = (
    "ATOMFORGE_INDEX_URL",
    "ATOMFORGE_DASK_",
    "ATOMFORGE_SLURM_",
    "ATOMFORGE_INPUT_ROOTS",
    "ATOMFORGE_TERMINAL_PROGRESS",
)
"""Settings a job script leaves out: a database URL may hold a password; a worker starts
no cluster (each task rebuilds its flow's runner there, which would import the cluster
class again), reads no input file and draws no progress bar."""


class SlurmSettings(BaseSettings):
    """What each SLURM job asks for and runs first; each field is ``ATOMFORGE_SLURM_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_SLURM_", extra="ignore")

    partition: str | None = Field(None, description="Partition (#SBATCH -p); default: SLURM's.")
    account: str | None = Field(None, description="Account to charge (#SBATCH -A).")
    qos: str | None = Field(None, description="Quality of service (#SBATCH --qos).")
    walltime: str = Field("01:00:00", description="Time limit of each job (#SBATCH -t).")
    cores: int = Field(
        1,
        ge=1,
        description="Cores of each job (#SBATCH --cpus-per-task): one Dask worker that runs "
        "as many engine tasks at once as their cores fit (set it to an MPI engine's cores "
        "or a multiple).",
    )
    memory: str = Field("2GB", description="Memory of each job (#SBATCH --mem).")
    max_jobs: int = Field(
        4, ge=1, description="Most jobs at once (ATOMFORGE_DASK_ADAPT_MAX, if set, wins)."
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines each job runs before its worker starts, e.g. "
        "'[\"module load xtb\"]' (JSON list).",
    )
    directives: list[str] = Field(
        default_factory=list,
        description="Extra #SBATCH directives, e.g. '[\"--constraint=haswell\"]' (JSON list).",
    )
    interface: str | None = Field(
        None,
        description="Network interface the scheduler and workers listen on (e.g. ib0); "
        "default: the login node's main address.",
    )
    scheduler_host: str | None = Field(
        None, description="Address the scheduler listens on, e.g. 127.0.0.1 on one machine."
    )
    python: str = Field(
        sys.executable, description="The Python that runs the Dask worker in each job."
    )


def is_slurm(settings: Settings) -> bool:
    """Return True if the settings ask for engines in SLURM jobs."""
    return settings.dask_cluster_class == SLURM_CLUSTER_CLASS


def max_jobs(settings: Settings, slurm: SlurmSettings | None = None) -> int:
    """Return the most SLURM jobs a run keeps at once."""
    return settings.dask_adapt_max or (slurm or SlurmSettings()).max_jobs


def new_job_name() -> str:
    """Return a new SLURM job name for one cluster's workers (``squeue --name`` finds them)."""
    return f"{JOB_NAME_PREFIX}{secrets.token_hex(4)}"


def exported_settings(settings: Settings) -> list[str]:
    """Return ``export`` lines for the atomforge settings the job's worker must share."""
    values = {
        key: value
        for key, value in sorted(os.environ.items())
        if key.startswith("ATOMFORGE_") and not key.startswith(NOT_EXPORTED)
    }
    values["ATOMFORGE_WORK_ROOT"] = str(settings.resolved_work_root())
    return [f"export {key}={shlex.quote(value)}" for key, value in sorted(values.items())]


def slurm_cluster_kwargs(settings: Settings, slurm: SlurmSettings | None = None) -> dict[str, Any]:
    """Return the SLURMCluster arguments for a run: its jobs' resources, directives, script.

    Each job is one Dask worker declaring its cores as the ``cores`` resource, so an
    N-core engine task takes N of them. The job asks for its cores as tasks on one node
    (``--ntasks=N --cpus-per-task=1``), so that ``mpirun`` inside it finds N slots in the
    allocation. Its logs go to ``<work root>/slurm``; the jobs of one cluster share a new
    name.
    """
    slurm = slurm or SlurmSettings()
    directives = ["--nodes=1", f"--ntasks={slurm.cores}", "--cpus-per-task=1"]
    directives += [f"--qos={slurm.qos}"] if slurm.qos else []
    log_directory = settings.resolved_work_root() / "slurm"
    prologue = [
        f"# atomforge: one Dask worker running engines on {slurm.cores} core(s)",
        *exported_settings(settings),
        "export OMP_NUM_THREADS=1",
        *slurm.setup,
    ]
    kwargs: dict[str, Any] = {
        "cores": slurm.cores,
        "processes": 1,
        "memory": slurm.memory,
        "walltime": slurm.walltime,
        "queue": slurm.partition,
        "account": slurm.account,
        "job_name": new_job_name(),
        "job_directives_skip": ["-n 1", "--cpus-per-task="],
        "job_extra_directives": [*directives, *slurm.directives],
        "job_script_prologue": prologue,
        "worker_extra_args": ["--resources", f"cores={slurm.cores}"],
        "log_directory": str(log_directory),
        "python": slurm.python,
        "interface": slurm.interface,
    }
    if slurm.scheduler_host:
        kwargs["scheduler_options"] = {"host": slurm.scheduler_host}
    return {key: value for key, value in kwargs.items() if value is not None}


def job_script(settings: Settings) -> str:
    """Return the job script a run would submit (the scheduler address a placeholder)."""
    from dask_jobqueue.slurm import SLURMJob

    kwargs = slurm_cluster_kwargs(settings) | settings.dask_cluster_kwargs
    kwargs.pop("scheduler_options", None)
    return SLURMJob(scheduler="tcp://SCHEDULER:8786", name="WORKER", **kwargs).job_script()


def jobs_named(name: str) -> list[str]:
    """Return the ids of the pending or running SLURM jobs called ``name``."""
    if not shutil.which("squeue"):
        return []
    listed = subprocess.run(
        ["squeue", "--noheader", "--format=%i", f"--name={name}"],
        capture_output=True,
        text=True,
    )
    return listed.stdout.split()


def cancel_jobs(name: str) -> list[str]:
    """Cancel the SLURM jobs called ``name``; return their ids."""
    ids = jobs_named(name)
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)
    return ids


def _record_path(settings: Settings, flow_run_id: str) -> Path:
    return settings.resolved_work_root() / "slurm" / "runs" / flow_run_id


def record_jobs(settings: Settings, flow_run_id: str, name: str) -> None:
    """Write down that the jobs called ``name`` work for flow run ``flow_run_id``.

    The record is a file, so that a hook running in another process (the Prefect worker
    that supervised a killed flow run) finds the jobs to cancel.
    """
    path = _record_path(settings, flow_run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(name)


def cancel_recorded_jobs(settings: Settings, flow_run_id: str) -> list[str]:
    """Cancel the SLURM jobs recorded for ``flow_run_id``; return their ids."""
    path = _record_path(settings, flow_run_id)
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return []
    ids = cancel_jobs(name)
    path.unlink(missing_ok=True)
    return ids
