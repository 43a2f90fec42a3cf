"""The README's production block, run as it stands: service up, status, a run submitted
at a priority, a deployment run, service down."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO
from tests.prefect_server import service, service_folder

pytestmark = pytest.mark.e2e


def _service_example() -> str:
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- service-example -->")[1].split("<!-- /service-example -->")[0]
    return re.search(r"```bash\n(.*?)```", block, re.S).group(1)


def test_the_readme_production_block_runs_as_it_stands():
    folder, env = service_folder()
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
