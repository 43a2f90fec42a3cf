"""The README's production block, run as it stands: service up, status, a run submitted
at a priority, a deployment run, service down."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.prefect_server import free_port, service

pytestmark = pytest.mark.e2e


def _service_example() -> str:
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- service-example -->")[1].split("<!-- /service-example -->")[0]
    return re.search(r"```bash\n(.*?)```", block, re.S).group(1)


def test_the_readme_production_block_runs_as_it_stands():
    folder = Path(tempfile.mkdtemp(prefix="atomforge-service-readme-"))
    folder.chmod(0o755)
    env = os.environ | {
        "ATOMFORGE_SERVICE_DIR": str(folder / "service"),
        "ATOMFORGE_SERVICE_PORT": str(free_port()),
        "ATOMFORGE_SERVICE_POSTGRES_PORT": str(free_port()),
        "ATOMFORGE_SERVICE_WORKER_HEALTH_PORT": str(free_port()),
        "ATOMFORGE_HOME": str(folder / "atomforge"),
        "PREFECT_HOME": str(folder / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    try:
        done = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + _service_example()],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        service(env, "down")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = done.stdout.split("\n")
    assert sum(line.split()[1:2] == ["up"] for line in status if line[:1].isalpha()) >= 4
    assert "stopped: worker, server, postgres" in done.stdout
    assert re.search(r"submitted .* to queue urgent", done.stdout), done.stdout
    shutil.rmtree(folder, ignore_errors=True)
