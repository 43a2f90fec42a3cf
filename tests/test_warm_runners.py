"""Warm ASE runners: forked from a zygote, they compute what cold ones compute, and a
timeout, a stop, a cancel or a ``kill -9`` of their owner still ends them (real tblite
and EMT runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from ase.build import bulk, molecule
from ase.io import read

from atomforge.engines import warm_runner
from atomforge.engines.process import kill_recorded, run_process
from atomforge.engines.registry import get_engine, make_parameters
from atomforge.engines.runloop import RunControl, _unfinished, prepare_runner, run_jobs
from atomforge.engines.status import RUNNER_STATUS_FILE, JobStatus, Status
from tests.conftest import REPO, water_cluster_xyz

RUNNER = [sys.executable, "-u", "-m", "atomforge.engines.ase_runner"]


def _prepare(root: Path, engine_name: str, structures: dict, **fields) -> list[Path]:
    """Write one job directory per structure under ``root``; return them."""
    engine = get_engine(engine_name)
    params = make_parameters(engine_name, **fields)
    directories = []
    for name, atoms in structures.items():
        directory = root / name
        directory.mkdir(parents=True)
        engine.write_inputs(atoms, params, directory)
        directories.append(directory)
    return directories


def _energies(root: Path, engine_name: str, structures: dict, **fields) -> dict[str, float]:
    """Run ``structures`` through the run loop; return their energies."""
    engine = get_engine(engine_name)
    params = make_parameters(engine_name, **fields)
    directories = _prepare(root, engine_name, structures, **fields)
    control = RunControl(root / "pids", root / "stop", lambda text: None, lambda d, s: None)
    run_jobs(engine, directories, params, control)
    energies = {}
    for directory in directories:
        assert JobStatus.read(directory).status is Status.completed
        energies[directory.name] = engine.read_results(directory, params).energy
    return energies


def _gone(pids: list[int], timeout: float = 15) -> bool:
    """Return True once none of ``pids`` runs (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _session(sid: int) -> list[int]:
    """Return the live, non-zombie processes of session ``sid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members


def _zygote_pid() -> int | None:
    current = warm_runner._ZYGOTES.current
    return current.proc.pid if current is not None and current.alive() else None


MOLECULES = {name: molecule(name) for name in ("H2O", "CH4", "NH3", "C2H4")}
METALS = {"Cu": bulk("Cu", cubic=True), "Au": bulk("Au") * (2, 2, 1)}


@pytest.mark.parametrize(
    ("engine_name", "structures", "fields"),
    [
        ("tblite", MOLECULES, {"kind": "optimize"}),
        ("emt", METALS, {"kind": "singlepoint", "forces": True}),
    ],
)
def test_a_warm_runner_computes_what_a_cold_one_does(
    tmp_path, monkeypatch, engine_name, structures, fields
):
    monkeypatch.setenv("ATOMFORGE_WARM_RUNNERS", "false")
    cold = _energies(tmp_path / "cold", engine_name, structures, **fields)
    monkeypatch.setenv("ATOMFORGE_WARM_RUNNERS", "true")
    warm = _energies(tmp_path / "warm", engine_name, structures, **fields)
    zygote = _zygote_pid()
    assert zygote is not None, "no zygote: the runner started cold"
    again = _energies(tmp_path / "again", engine_name, structures, **fields)
    assert _zygote_pid() == zygote, "the second chunk did not use the same zygote"
    assert warm == cold == again


def _long_job(root: Path) -> tuple[list[str], Path]:
    """Prepare a tblite optimization of 64 waters (minutes); return its runner argv and
    the folder to run it in."""
    from io import StringIO

    cluster = read(StringIO(water_cluster_xyz(4)), format="xyz")
    directories = _prepare(root, "tblite", {"cluster": cluster}, kind="optimize")
    return [*RUNNER, *map(str, directories)], root


def _run_in_thread(argv: list[str], cwd: Path, timeout: float) -> tuple[threading.Thread, dict]:
    """Run ``argv`` with :func:`run_process` in a thread; return it and its result box."""
    box: dict = {}

    def target() -> None:
        box["outcome"] = run_process(
            argv,
            cwd=cwd,
            timeout=timeout,
            pid_dir=cwd / "pids",
            stop_file=cwd / "stop",
            log=lambda text: None,
            log_name="runner.log",
            env={"OMP_NUM_THREADS": "1"},
        )

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _wait_for_record(pid_dir: Path, timeout: float = 60) -> dict:
    """Return the pid record of the running runner once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in pid_dir.glob("*.json"):
            try:
                return json.loads(path.read_text())
            except ValueError:
                continue
        time.sleep(0.05)
    raise AssertionError("no runner was recorded")


def _assert_warm(pid: int) -> None:
    """Assert that ``pid`` is a runner forked by the zygote, in a session of its own."""
    assert psutil.Process(pid).ppid() == _zygote_pid(), "the runner was not forked warm"
    assert os.getsid(pid) == pid


def test_a_warm_runner_past_its_timeout_is_killed_and_marked_timeout(tmp_path):
    argv, cwd = _long_job(tmp_path)
    thread, box = _run_in_thread(argv, cwd, timeout=3.0)
    record = _wait_for_record(cwd / "pids")
    _assert_warm(record["pid"])
    thread.join(60)
    outcome = box["outcome"]
    assert outcome.timed_out and outcome.returncode < 0
    assert outcome.wall_seconds < 15
    assert _unfinished(outcome).status is Status.timeout
    assert _gone([record["pid"]]) and not _session(record["pid"])
    assert not list((cwd / "pids").glob("*.json"))


def test_a_stop_file_kills_the_warm_runners_tree(tmp_path):
    argv, cwd = _long_job(tmp_path)
    thread, box = _run_in_thread(argv, cwd, timeout=600)
    record = _wait_for_record(cwd / "pids")
    _assert_warm(record["pid"])
    time.sleep(1.0)
    (cwd / "stop").touch()
    thread.join(60)
    assert box["outcome"].stopped
    assert _gone([record["pid"]]) and not _session(record["pid"])


def test_a_cancel_hook_kills_the_warm_runner_through_its_record(tmp_path):
    argv, cwd = _long_job(tmp_path)
    thread, box = _run_in_thread(argv, cwd, timeout=600)
    record = _wait_for_record(cwd / "pids")
    _assert_warm(record["pid"])
    assert record["pid"] in kill_recorded(cwd / "pids")
    thread.join(60)
    assert box["outcome"].returncode < 0 and not box["outcome"].timed_out
    assert _gone([record["pid"]]) and not _session(record["pid"])


def test_warm_runners_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOMFORGE_WARM_RUNNERS", "false")
    argv, cwd = _long_job(tmp_path)
    thread, box = _run_in_thread(argv, cwd, timeout=600)
    record = _wait_for_record(cwd / "pids")
    assert psutil.Process(record["pid"]).ppid() == os.getpid()
    (cwd / "stop").touch()
    thread.join(60)
    assert box["outcome"].stopped and _gone([record["pid"]])


OWNER_SCRIPT = """
import os, sys, time
from pathlib import Path
from atomforge.engines.process import run_process
from atomforge.engines.warm_runner import prewarm

if os.environ.get("OWNER_FORKS_ZYGOTE"):
    prewarm(sys.argv[3:], dict(os.environ), "emt", fork=True)

cwd = Path(sys.argv[1])
outcome = run_process(
    sys.argv[3:], cwd=cwd, timeout=float(sys.argv[2]), pid_dir=cwd / "pids",
    stop_file=cwd / "stop", log=lambda text: None, log_name="runner.log",
)
from atomforge.engines import warm_runner

print("returncode", outcome.returncode, flush=True)
print("zygote", warm_runner._ZYGOTES.current.proc.pid, flush=True)
time.sleep(0.5)
"""


def _start_owner(cwd: Path, argv: list[str], timeout: float, forks: bool) -> subprocess.Popen:
    """Start a process that runs ``argv`` with run_process (with ``forks``, forking its
    zygote from itself); return it."""
    script = cwd / "owner.py"
    script.write_text(OWNER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if forks:
        env["OWNER_FORKS_ZYGOTE"] = "1"
    return subprocess.Popen(
        [sys.executable, str(script), str(cwd), str(timeout), *argv],
        cwd=REPO,
        stdout=(cwd / "owner.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _assert_zygote_of(owner: subprocess.Popen, zygote: int, forked: bool) -> None:
    """Assert that ``zygote`` is ``owner``'s, forked from it or started anew as asked."""
    process = psutil.Process(zygote)
    assert process.ppid() == owner.pid
    started_anew = "atomforge.engines.zygote" in " ".join(process.cmdline())
    assert started_anew is not forked


@pytest.mark.parametrize("forked", [False, True], ids=["started", "forked"])
def test_kill_9_of_the_owner_leaves_no_runner_and_no_zygote(tmp_path, forked):
    argv, cwd = _long_job(tmp_path)
    owner = _start_owner(cwd, argv, timeout=600, forks=forked)
    try:
        record = _wait_for_record(cwd / "pids")
        runner = psutil.Process(record["pid"])
        zygote = runner.ppid()
        _assert_zygote_of(owner, zygote, forked)
        assert os.getsid(runner.pid) == runner.pid
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        assert _gone([runner.pid, zygote], timeout=10), "a runner or zygote outlived its owner"
        assert not _session(runner.pid)
    finally:
        if owner.poll() is None:
            owner.kill()


@pytest.mark.parametrize("forked", [False, True], ids=["started", "forked"])
def test_the_zygote_ends_with_its_owner(tmp_path, forked):
    directories = _prepare(tmp_path, "emt", {"Cu": bulk("Cu", cubic=True)})
    argv = [*RUNNER, *map(str, directories)]
    owner = _start_owner(tmp_path, argv, timeout=120, forks=forked)
    owner.wait(timeout=120)
    output = (tmp_path / "owner.log").read_text()
    assert "returncode 0" in output, output
    assert JobStatus.read(directories[0], RUNNER_STATUS_FILE).status is Status.completed
    zygote = int(output.split("zygote ")[1].split()[0])
    assert _gone([zygote], timeout=10), "the zygote outlived its owner"
    log = (tmp_path / "runner.log").read_text()
    assert "atomforge-job-done" in log


def test_a_failing_calculator_fails_warm_as_it_fails_cold(tmp_path, monkeypatch):
    """EMT has no parameters for xenon: the runner reports the same failure either way."""
    from ase import Atoms

    xenon = {"Xe2": Atoms("Xe2", positions=[(0, 0, 0), (0, 0, 3.0)])}
    outcomes = {}
    for mode in ("false", "true"):
        monkeypatch.setenv("ATOMFORGE_WARM_RUNNERS", mode)
        directories = _prepare(tmp_path / mode, "emt", xenon)
        params = make_parameters("emt")
        control = RunControl(
            tmp_path / "pids", tmp_path / "stop", lambda t: None, lambda d, s: None
        )
        run_jobs(get_engine("emt"), directories, params, control)
        status = JobStatus.read(directories[0])
        log = next((tmp_path / mode).glob("*.runner.log")).read_text()
        assert "Traceback" in log
        outcomes[mode] = (status.status, status.message)
    assert outcomes["true"] == outcomes["false"]
    assert outcomes["true"][0] is Status.failed


def test_prepare_runner_starts_the_zygote_the_first_chunk_is_forked_from(tmp_path, monkeypatch):
    """What a run does once it knows it has structures to compute: the engine's zygote
    starts then, and the first chunk finds it (same environment) rather than starting
    another; an engine without a runner (xtb) starts none."""
    monkeypatch.setenv("ATOMFORGE_WARM_RUNNERS", "true")
    engine = get_engine("tblite")
    params = make_parameters("tblite", kind="optimize")
    warm_runner._ZYGOTES.forget()
    prepare_runner(get_engine("xtb"), make_parameters("xtb"))
    assert _zygote_pid() is None
    prepare_runner(engine, params)
    zygote = _zygote_pid()
    assert zygote is not None
    directories = _prepare(tmp_path, "tblite", {"H2O": MOLECULES["H2O"]}, kind="optimize")
    control = RunControl(tmp_path / "pids", tmp_path / "stop", lambda text: None, lambda d, s: None)
    run_jobs(engine, directories, params, control)
    assert JobStatus.read(directories[0]).status is Status.completed
    assert _zygote_pid() == zygote  # a chunk of another environment would have replaced it


def test_a_command_starts_the_zygote_before_its_flow_run(monkeypatch):
    """``atomforge run`` and ``screen`` start the zygote of a batch engine as the flow run
    starts, with the environment its chunks will have (the flow's own start finds it);
    not for an engine without a runner, nor for chunks that go to another scheduler."""
    from atomforge.flows.runner_start import start_runner

    monkeypatch.setenv("ATOMFORGE_WARM_RUNNERS", "true")
    warm_runner._ZYGOTES.forget()
    start_runner(make_parameters("xtb"))
    assert _zygote_pid() is None
    params = make_parameters("tblite", kind="optimize")
    monkeypatch.setenv("ATOMFORGE_DASK_ADDRESS", "tcp://127.0.0.1:1")
    start_runner(params)
    assert _zygote_pid() is None
    monkeypatch.delenv("ATOMFORGE_DASK_ADDRESS")
    start_runner(params)
    zygote = _zygote_pid()
    assert zygote is not None
    prepare_runner(get_engine("tblite"), params)  # what the flow does before its chunks
    assert _zygote_pid() == zygote


def test_a_request_child_starts_the_zygote_from_its_runs_parameters(monkeypatch):
    """A request's child in the warm consumer starts the zygote from the run's parameters
    as the API holds them (a ``simulate`` or ``screen`` form of a batch engine); a run
    without a form, with an engine that has no runner, or with a form that does not
    validate starts none."""
    from atomforge.flows.runner_start import start_runner_of_run

    monkeypatch.setenv("ATOMFORGE_WARM_RUNNERS", "true")
    warm_runner._ZYGOTES.forget()
    for parameters in (
        {},
        {"spec": {"steps": []}},
        {"parameters": {"engine": "xtb"}},
        {"parameters": {"engine": "tblite", "charge": "one"}},
        {"parameters": {"engine": "no-such-engine"}},
    ):
        start_runner_of_run(parameters)
        assert _zygote_pid() is None, parameters
    start_runner_of_run({"source": {"path": "water.xyz"}, "parameters": {"engine": "tblite"}})
    zygote = _zygote_pid()
    assert zygote is not None
    params = make_parameters("tblite")
    prepare_runner(get_engine("tblite"), params)  # what the flow does before its chunks
    assert _zygote_pid() == zygote


def test_a_zygote_is_forked_only_with_the_threads_its_owner_loaded_with(monkeypatch):
    """Asked to fork its zygote, a process starts it anew instead when the chunk's
    environment gives the numerical libraries other threads than it loaded them with."""
    from atomforge.engines.process import engine_environment

    monkeypatch.setenv("ATOMFORGE_WARM_RUNNERS", "true")
    warm_runner._ZYGOTES.forget()
    command = get_engine("tblite").command(make_parameters("tblite"), [])
    env = engine_environment(command.env) | {"OMP_NUM_THREADS": "7", "MKL_NUM_THREADS": "7"}
    assert warm_runner._threads(env) != warm_runner._LOADED_THREADS
    warm_runner.prewarm(command.argv, env, "tblite", fork=True)
    zygote = _zygote_pid()
    assert zygote is not None
    assert "atomforge.engines.zygote" in " ".join(psutil.Process(zygote).cmdline())
    warm_runner._ZYGOTES.forget()
