"""Test set-up: a private Prefect home (embedded API) and atomforge home for the session."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="atomforge-tests-"))
os.environ["PREFECT_HOME"] = str(SESSION_HOME / "prefect")
os.environ["ATOMFORGE_HOME"] = str(SESSION_HOME / "atomforge")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("ATOMFORGE_DASK_WORKERS", "2")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ["ATOMFORGE_REUSE"] = "false"  # each test computes; tests of reuse turn it on
os.environ.setdefault("ATOMFORGE_LOCAL_SERVER", "false")  # tests of it turn it on
os.environ["ATOMFORGE_CACHE_DIR"] = str(SESSION_HOME / "cache")  # local servers' database
REPO = Path(__file__).resolve().parents[1]
os.environ["ATOMFORGE_INPUT_ROOTS"] = json.dumps([tempfile.gettempdir(), str(REPO)])

WATER_XYZ = """3
water
O 0.000000 0.000000 0.119262
H 0.000000 0.763239 -0.477047
H 0.000000 -0.763239 -0.477047
"""


def water_cluster_xyz(side: int = 4, spacing: float = 3.1) -> str:
    """Return XYZ text of side**3 water molecules on a grid: xtb needs minutes to optimize it."""
    from ase import Atoms
    from ase.build import molecule

    cluster = Atoms()
    for i, j, k in itertools.product(range(side), repeat=3):
        water = molecule("H2O")
        water.translate((spacing * i, spacing * j, spacing * k))
        cluster += water
    lines = [str(len(cluster)), "water cluster"]
    lines += [f"{a.symbol} {a.x:.6f} {a.y:.6f} {a.z:.6f}" for a in cluster]
    return "\n".join(lines) + "\n"


def xtb_process(pid: int, timeout: float = 30) -> psutil.Process:
    """Return the engine process ``pid`` once it runs xtb: atomforge starts it as
    ``setpriv ... prlimit ... xtb``, each exec-ing the next in the same process."""
    import time

    process = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    while "xtb" not in process.name():
        assert time.monotonic() < deadline, f"{process} never became xtb"
        time.sleep(0.05)
    return process


FLOW_SCRIPT = """
import asyncio
import json
import os
import sys
from atomforge.flows.models import make_parameters, StructureSource
from atomforge.flows.{flow} import {flow}

if __name__ == "__main__":
    if not os.environ.get("PREFECT_API_URL"):
        from atomforge.flows import embedded_server

        embedded_server.start()
    params = make_parameters(**json.loads(sys.argv[2]))
    asyncio.run({flow}(StructureSource(path=sys.argv[1]), params))
"""


def start_simulate_process(tmp_path: Path, structure: Path, **parameters) -> subprocess.Popen:
    """Start ``simulate`` of ``structure`` in a process of its own; return that process."""
    return _start_flow_process(tmp_path, "simulate", structure, parameters)


def start_screen_process(tmp_path: Path, source: Path, **parameters) -> subprocess.Popen:
    """Start ``screen`` of ``source`` in a process of its own; return that process."""
    return _start_flow_process(tmp_path, "screen", source, parameters)


def _start_flow_process(
    tmp_path: Path, flow: str, source: Path, parameters: dict
) -> subprocess.Popen:
    script = tmp_path / f"{flow}_process.py"
    script.write_text(FLOW_SCRIPT.replace("{flow}", flow))
    with (tmp_path / f"{flow}_process.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, str(script), str(source), json.dumps(parameters)],
            cwd=REPO,
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


ATOMFORGE = str(Path(sys.executable).with_name("atomforge"))


def run_atomforge(
    env: dict[str, str], *args: str, stdin: str | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run the atomforge command in ``cwd`` (the repository) with ``env``; return how it
    ended."""
    return subprocess.run(
        [ATOMFORGE, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
    )


def use_xtb_wrapper(path: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write ``script`` to ``path`` as an executable and make it the xtb command; return it."""
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("ATOMFORGE_XTB_COMMAND", str(path))
    return path


@pytest.fixture
def water_file(tmp_path: Path) -> Path:
    """Return the path of an xyz file holding one water molecule."""
    path = tmp_path / "water.xyz"
    path.write_text(WATER_XYZ)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_session_home():
    yield
    shutil.rmtree(SESSION_HOME, ignore_errors=True)
