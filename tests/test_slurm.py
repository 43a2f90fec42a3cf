"""Engines in SLURM jobs, on a real single-node SLURM (munged, slurmctld, slurmd) started here."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ase.build import molecule

from atomforge.deployments import local_slurm
from atomforge.engines.status import JobStatus
from atomforge.engines.structures import to_extxyz
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.scheduling.slurm import job_script
from atomforge.flows.screen import screen
from atomforge.flows.settings import Settings
from atomforge.flows.store.files import load_run, query_results
from tests.conftest import REPO, water_cluster_xyz

pytestmark = pytest.mark.slurm

SLURM_SETTINGS = {
    "ATOMFORGE_DASK_CLUSTER_CLASS": "dask_jobqueue.SLURMCluster",
    "ATOMFORGE_SLURM_SCHEDULER_HOST": "127.0.0.1",
    "ATOMFORGE_SLURM_MEMORY": "1GB",
    "ATOMFORGE_SLURM_MAX_JOBS": "2",
    "ATOMFORGE_SLURM_WALLTIME": "00:10:00",
}
"""What the README's "On a cluster" section sets, for this machine's local SLURM."""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start the local SLURM with the script a person would use; stop it afterwards."""
    assert local_slurm.available(), "install slurm-wlm and munge (.ci/setup does)"
    folder = tmp_path_factory.mktemp("slurm")
    started = _local_slurm("start", folder)
    conf = started.stdout.split("SLURM_CONF=")[1].strip()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield folder
    finally:
        _local_slurm("stop", folder)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture
def on_slurm(slurm, monkeypatch):
    """Point atomforge at the local SLURM for one test."""
    for key, value in SLURM_SETTINGS.items():
        monkeypatch.setenv(key, value)
    yield slurm
    _wait_until_no_jobs(timeout=30)


def _local_slurm(action: str, folder: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "atomforge.deployments.local_slurm", action, str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _squeue(*args: str) -> list[str]:
    """Return the ids of the jobs SLURM holds (pending or running)."""
    listed = subprocess.run(
        ["squeue", "--noheader", "--format=%i", *args], capture_output=True, text=True, check=True
    )
    return listed.stdout.split()


def _wait_until_no_jobs(timeout: float = 60) -> None:
    """Wait until SLURM holds no job (a cancelled job lingers while its processes end)."""
    deadline = time.monotonic() + timeout
    while _squeue():
        assert time.monotonic() < deadline, f"jobs still queued: {_squeue()}"
        time.sleep(0.5)


def _statuses(flow_run_id: str) -> dict[str, JobStatus]:
    summary = load_run(Settings().resolved_results_root(), flow_run_id)
    work_dir = Path(summary.work_dir)
    return {d.name: JobStatus.read(d) for d in sorted(work_dir.iterdir()) if d.is_dir()}


def test_the_local_slurm_script_reports_its_daemons(slurm):
    out = _local_slurm("status", slurm).stdout
    assert out.count("running, pid") == 3, out
    nodes = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True)
    assert nodes.stdout.strip() in {"idle", "mixed", "allocated"}


def test_the_job_script_says_what_each_job_asks_for_and_loads(monkeypatch):
    for key, value in {
        "ATOMFORGE_DASK_CLUSTER_CLASS": "dask_jobqueue.SLURMCluster",
        "ATOMFORGE_SLURM_PARTITION": "short",
        "ATOMFORGE_SLURM_ACCOUNT": "chem42",
        "ATOMFORGE_SLURM_QOS": "high",
        "ATOMFORGE_SLURM_WALLTIME": "02:00:00",
        "ATOMFORGE_SLURM_CORES": "8",
        "ATOMFORGE_SLURM_SETUP": '["module load xtb/6.5"]',
        "ATOMFORGE_SLURM_DIRECTIVES": '["--constraint=haswell"]',
        "ATOMFORGE_INDEX_URL": "postgresql://atomforge:secret@db/atomforge",
    }.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    script = job_script(settings)
    for line in (
        "#SBATCH -p short",
        "#SBATCH -A chem42",
        "#SBATCH --qos=high",
        "#SBATCH -t 02:00:00",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=8",
        "#SBATCH --constraint=haswell",
        "module load xtb/6.5",
        "export OMP_NUM_THREADS=1",
        f"export ATOMFORGE_WORK_ROOT={settings.resolved_work_root()}",
        f"#SBATCH -o {settings.resolved_work_root() / 'slurm'}",
    ):
        assert line in script, (line, script)
    assert "--resources cores=8" in script
    assert "secret" not in script and "ATOMFORGE_SLURM_" not in script
    assert script.index("module load") < script.index("distributed.cli.dask_worker")


def test_a_screen_on_slurm_gives_the_local_results_from_inside_slurm_jobs(on_slurm, monkeypatch):
    text = "".join(to_extxyz(molecule(name)) for name in ("H2O", "NH3", "CH4", "HF"))
    params = make_parameters(engine="xtb", kind="singlepoint")
    on_cluster = asyncio.run(screen(StructureSource(text=text), params))
    _wait_until_no_jobs(timeout=30)
    for key in SLURM_SETTINGS:
        monkeypatch.delenv(key)
    local = asyncio.run(screen(StructureSource(text=text), params))
    assert on_cluster.n_completed == local.n_completed == 4
    assert [(r.name, r.energy_eV) for r in on_cluster.results] == [
        (r.name, r.energy_eV) for r in local.results
    ]
    jobs = {status.batch_job for status in _statuses(on_cluster.flow_run_id).values()}
    assert None not in jobs and len(jobs) >= 1, jobs
    documents = query_results(
        Settings().resolved_results_root(), flow_run_id=on_cluster.flow_run_id
    )
    assert {document.batch_job for document in documents} == jobs
    assert {status.batch_job for status in _statuses(local.flow_run_id).values()} == {None}
    logs = Settings().resolved_work_root() / "slurm"
    assert list(logs.glob("atomforge-*.err")), "each job keeps its output in <work root>/slurm"


def test_a_job_cancelled_mid_screen_loses_no_structure(on_slurm, tmp_path):
    source = tmp_path / "clusters"
    source.mkdir()
    for i in range(6):
        (source / f"cluster{i}.xyz").write_text(water_cluster_xyz(2, spacing=3.1 + 0.05 * i))
    params = make_parameters(engine="xtb", kind="optimize")

    async def screen_and_cancel_a_job():
        run = asyncio.create_task(screen(StructureSource(path=str(source)), params))
        cancelled = await asyncio.to_thread(_cancel_a_job_once_it_completed_one, tmp_path)
        return await run, cancelled

    report, cancelled = asyncio.run(screen_and_cancel_a_job())
    assert report.n_completed == 6, [(r.name, r.status, r.message) for r in report.results]
    by_job = [status.batch_job for status in _statuses(report.flow_run_id).values()]
    assert cancelled in by_job, "what the cancelled job completed is kept, not computed again"
    assert set(by_job) - {cancelled}, "the rest was computed in another job"


def _cancel_a_job_once_it_completed_one(tmp_path: Path) -> str:
    """Wait until a structure of the screen completed in a SLURM job; scancel that job."""
    work_root = Settings().resolved_work_root()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for path in work_root.glob("*/*/status.json"):
            status = JobStatus.read(path.parent)
            if status and status.completed and status.batch_job in _squeue():
                subprocess.run(["scancel", status.batch_job], check=True)
                return status.batch_job
        time.sleep(0.2)
    raise AssertionError("no structure completed in a SLURM job")


def test_a_killed_run_cancels_its_slurm_jobs_and_engines(on_slurm, tmp_path):
    from tests.conftest import start_screen_process

    source = tmp_path / "clusters"
    source.mkdir()
    for i in range(2):
        (source / f"cluster{i}.xyz").write_text(water_cluster_xyz(3))
    flow = start_screen_process(tmp_path, source, engine="xtb", kind="optimize")
    engines = _wait_for_engines_in_jobs()
    flow.terminate()
    assert flow.wait(timeout=60) != 0
    _wait_until_no_jobs(timeout=30)
    for engine in engines:
        engine.wait(timeout=30)


def _wait_for_engines_in_jobs(timeout: float = 180) -> list[psutil.Process]:
    """Return the xtb processes running inside SLURM jobs, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for process in psutil.process_iter(["name"]):
            try:
                if process.info["name"] == "xtb" and "SLURM_JOB_ID" in process.environ():
                    found.append(process)
            except psutil.Error:
                continue
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no xtb inside a SLURM job; queue: {_squeue()}")


def test_an_engine_task_wider_than_a_job_is_refused_before_any_job(on_slurm):
    params = make_parameters(engine="xtb", kind="singlepoint", cores=2)
    with pytest.raises(Exception, match="each SLURM job has 1 core"):
        asyncio.run(screen(StructureSource(text=to_extxyz(molecule("H2O"))), params))


def test_an_mpi_engine_runs_on_the_cores_its_job_asked_for(on_slurm, monkeypatch):
    from ase.build import bulk

    from tests.test_espresso import SI_ENERGY_EV, SI_OPTIONS

    monkeypatch.setenv("ATOMFORGE_SLURM_CORES", "2")
    params = make_parameters("espresso", kind="singlepoint", cores=2, options=SI_OPTIONS)
    silicon = bulk("Si", "diamond", a=5.43)
    report = asyncio.run(screen(StructureSource(text=to_extxyz(silicon)), params))
    (result,) = report.results
    assert result.status == "completed", result.message
    assert result.energy_eV == pytest.approx(SI_ENERGY_EV, abs=1e-4)
    work_dir = Path(load_run(Settings().resolved_results_root(), report.flow_run_id).work_dir)
    (output,) = work_dir.glob("*/espresso.pwo")
    assert re.search(r"Parallel version \(MPI\), running on\s+2 processors", output.read_text())
    (status,) = _statuses(report.flow_run_id).values()
    assert status.batch_job is not None
