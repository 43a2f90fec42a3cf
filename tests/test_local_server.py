"""The local server: started by the first command, reused by the next, reported, stopped;
two commands at once start one; a stale record is replaced. Real server processes, each
stopped by the test that started it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ATOMFORGE, REPO, WATER_XYZ, run_atomforge, water_cluster_xyz
from tests.test_cli_signals import wait_until


@pytest.fixture
def server_env(tmp_path: Path):
    """Yield an environment whose commands use a local server of their own; stop it after."""
    env = os.environ.copy() | {
        "ATOMFORGE_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "ATOMFORGE_LOCAL_SERVER": "true",
    }
    env.pop("PREFECT_API_URL", None)
    yield env
    run_atomforge(env, "server", "stop")


def record(env: dict[str, str]) -> dict:
    """Return the local server's record (server.json)."""
    return json.loads((Path(env["ATOMFORGE_HOME"]) / "server" / "server.json").read_text())


def running(pid: int) -> bool:
    """Return whether process ``pid`` exists and is not a zombie."""
    try:
        return " Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    except OSError:
        return False


def test_first_command_starts_the_server_the_next_reuses_it_status_and_stop(server_env):
    server_env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the runs' logs go to the server
    first = run_atomforge(server_env, "run", "-", "--kind", "singlepoint", stdin=WATER_XYZ)
    assert first.returncode == 0, first.stderr
    assert "-5.07" in first.stdout and "completed" in first.stdout
    server = record(server_env)
    assert running(server["pid"])
    second = run_atomforge(
        server_env, "run", "-", "--kind", "singlepoint", "--json", stdin=WATER_XYZ
    )
    assert second.returncode == 0, second.stderr
    assert record(server_env)["pid"] == server["pid"]
    assert json.loads(second.stdout.splitlines()[0])["status"] == "completed"

    runs = httpx.post(f"{server['api_url']}/flow_runs/filter", json={}, timeout=10).json()
    assert sorted(run["state_type"] for run in runs) == ["COMPLETED", "COMPLETED"]
    assert all(run["name"].startswith("simulate xtb singlepoint") for run in runs), runs
    for run in runs:  # each command's run logs reached the server before the command ended
        logs = httpx.post(
            f"{server['api_url']}/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [run["id"]]}}},
            timeout=10,
        ).json()
        assert any(log["message"].startswith("Finished in state") for log in logs), logs

    status = run_atomforge(server_env, "server", "status")
    assert status.returncode == 0 and f"pid {server['pid']}, healthy" in status.stdout

    bad = run_atomforge(server_env, "run", "-", "--charge", "one", stdin=WATER_XYZ)
    assert bad.returncode == 2 and bad.stderr.startswith("atomforge: error: charge"), bad.stderr

    stopped = run_atomforge(server_env, "server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not running(server["pid"])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server['api_url']}/health", timeout=2)
    after = run_atomforge(server_env, "server", "status")
    assert after.returncode == 1 and "no local server" in after.stdout


def test_two_commands_at_once_start_one_server_and_a_stale_record_is_replaced(server_env):
    commands = [
        subprocess.Popen(
            [ATOMFORGE, "run", "-", "--kind", "singlepoint"],
            env=server_env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for command in commands:
        _, err = command.communicate(WATER_XYZ, timeout=300)
        assert command.returncode == 0, err
    folder = Path(server_env["ATOMFORGE_HOME"]) / "server"
    assert (folder / "server.log").read_text().count("local server ready") == 1
    first = record(server_env)

    run_atomforge(server_env, "server", "stop")
    gone = subprocess.Popen(["true"])
    gone.wait()
    (folder / "server.json").write_text(json.dumps(first | {"pid": gone.pid}))
    stale = run_atomforge(server_env, "server", "status")
    assert stale.returncode == 1 and "stale record" in stale.stdout

    again = run_atomforge(server_env, "run", "-", "--kind", "singlepoint", stdin=WATER_XYZ)
    assert again.returncode == 0, again.stderr
    assert record(server_env)["pid"] not in {first["pid"], gone.pid}
    assert running(record(server_env)["pid"])


def test_a_configured_prefect_api_or_the_opt_out_starts_no_server(tmp_path):
    env = os.environ.copy() | {
        "ATOMFORGE_HOME": str(tmp_path / "home"),
        "ATOMFORGE_LOCAL_SERVER": "false",
    }
    env.pop("PREFECT_API_URL", None)
    out = run_atomforge(env, "run", "-", "--kind", "singlepoint", stdin=WATER_XYZ)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "home" / "server" / "server.json").exists()
    from atomforge.flows import local_server

    assert not local_server.enabled({"PREFECT_API_URL": "http://127.0.0.1:1/api"})
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://10.0.0.1:4200/api"\n'
    )
    assert not local_server.enabled({"PREFECT_PROFILES_PATH": str(profiles)})
    assert local_server.enabled({"PREFECT_HOME": str(tmp_path / "empty")})


def test_a_new_home_starts_from_the_database_the_first_server_kept(tmp_path):
    """The first local server of this Prefect version keeps its new database and the
    record of the block types registered in it; the server of the next new home starts
    from a copy of it (no migrations, no block registration: its block types are there)
    and runs a command."""
    import prefect

    from atomforge.flows.database_template import block_types_stamp

    cache = tmp_path / "cache"
    homes = []
    for name in ("first", "second"):
        env = os.environ.copy() | {
            "ATOMFORGE_HOME": str(tmp_path / name),
            "ATOMFORGE_LOCAL_SERVER": "true",
            "ATOMFORGE_CACHE_DIR": str(cache),
        }
        env.pop("PREFECT_API_URL", None)
        homes.append(env)
        try:
            ran = run_atomforge(env, "run", "-", "--kind", "singlepoint", "--json", stdin=WATER_XYZ)
            api = record(env)["api_url"]
            assert httpx.get(f"{api}/block_types/slug/local-file-system").status_code == 200
        finally:
            run_atomforge(env, "server", "stop")
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout.splitlines()[0])["status"] == "completed"
    first, second = (Path(env["ATOMFORGE_HOME"]) / "server" / "server.log" for env in homes)
    kept = cache / f"prefect-{prefect.__version__}.db"
    assert f"database kept for new local servers: {kept}" in first.read_text()
    assert f"database copied from {kept}" in second.read_text()
    assert "database kept" not in second.read_text()
    stamp = block_types_stamp(prefect.__version__)
    assert stamp.startswith(f"prefect=={prefect.__version__}")
    assert (cache / f"prefect-{prefect.__version__}.blocks").read_text() == stamp
    assert "block types already registered" not in first.read_text()
    assert f"block types already registered by {stamp}" in second.read_text()


def test_server_prepare_builds_the_database_new_homes_start_from_and_leaves_no_server(
    tmp_path,
):
    """``atomforge server prepare`` (what .ci/setup runs) keeps a migrated database with
    its block types record for the installed Prefect, through a throwaway home whose
    server it stops; a kept database whose record names other collections is built
    again; one that matches is kept as it is and nothing starts."""
    import prefect
    import psutil

    cache = tmp_path / "cache"
    env = os.environ.copy() | {
        "ATOMFORGE_HOME": str(tmp_path / "home"),
        "ATOMFORGE_CACHE_DIR": str(cache),
    }
    env.pop("PREFECT_API_URL", None)
    kept = cache / f"prefect-{prefect.__version__}.db"
    stamp = kept.with_suffix(".blocks")
    built = []
    for step in ("build", "stale", "kept"):
        if step == "stale":
            stamp.write_text(f"prefect=={prefect.__version__}; a-collection==0.1")
        prepared = run_atomforge(env, "server", "prepare")
        assert prepared.returncode == 0, prepared.stderr
        assert prepared.stdout.strip() == f"new local servers start from {kept}"
        built.append(kept.stat().st_ino)
    assert built[0] != built[1] == built[2]
    assert stamp.read_text().startswith(f"prefect=={prefect.__version__}")
    assert "a-collection" not in stamp.read_text()
    assert not (tmp_path / "home").exists()
    throwaway = f"{tempfile.gettempdir()}/atomforge-prepare-"
    for process in psutil.process_iter(["cmdline", "environ"]):
        if "serve" in (process.info["cmdline"] or []):
            home = (process.info["environ"] or {}).get("ATOMFORGE_HOME", "")
            assert not home.startswith(throwaway), process


def test_a_tblite_command_forks_its_runner_zygote_and_ctrl_c_stops_both(server_env, tmp_path):
    """A command's child in the local server forks the runner zygote from itself (it has
    ASE imported: no new Python); Ctrl-C of the command stops the runner and the zygote."""
    cluster = tmp_path / "cluster.xyz"
    cluster.write_text(water_cluster_xyz(4))  # 64 waters: minutes of optimization
    command = subprocess.Popen(
        [ATOMFORGE, "run", str(cluster), "--engine", "tblite", "--kind", "optimize"],
        env=server_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        control = Path(server_env["ATOMFORGE_HOME"]) / "work" / ".control"
        assert wait_until(lambda: any(control.glob("*/pids/*.json")), timeout=240)
        pid = json.loads(next(control.glob("*/pids/*.json")).read_text())["pid"]
        runner = psutil.Process(pid)
        zygote = runner.parent()
        assert zygote.parent().parent().pid == record(server_env)["pid"]
        assert "atomforge.flows.local_server" in " ".join(zygote.cmdline())  # forked
        command.send_signal(signal.SIGINT)
        assert command.wait(timeout=60) == 130, command.stderr.read()
        assert wait_until(lambda: not running(runner.pid) and not running(zygote.pid), 30)
    finally:
        if command.poll() is None:
            command.kill()
