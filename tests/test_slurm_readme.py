"""The README's "On a cluster" block, run as it stands against the local SLURM it starts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from atomforge.deployments import local_slurm
from tests.conftest import REPO

pytestmark = pytest.mark.slurm

SLURM_FOLDER = Path("/tmp/atomforge-slurm")
SHARED_HOME = Path("/tmp/atomforge-shared")


def _cluster_example() -> str:
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- cluster-example -->")[1].split("<!-- /cluster-example -->")[0]
    return re.search(r"```bash\n(.*?)```", block, re.S).group(1)


def test_the_readme_cluster_example_runs_engines_in_slurm_jobs():
    assert local_slurm.available(), "install slurm-wlm and munge (.ci/setup does)"
    shutil.rmtree(SHARED_HOME, ignore_errors=True)
    script = "set -euo pipefail\n" + _cluster_example()
    try:
        done = subprocess.run(
            ["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
        )
    finally:
        local_slurm.stop(SLURM_FOLDER)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "#SBATCH -p debug" in out and "module load" not in out
    assert re.search(r"echo job \$SLURM_JOB_ID on \$\(hostname\)", out)
    assert len(re.findall(r"^ +\d+ .* completed ", out, re.M)) == 6, out
    job_logs = list((SHARED_HOME / "work" / "slurm").glob("atomforge-*.out"))
    assert job_logs and all("job " in log.read_text() for log in job_logs)
    shutil.rmtree(SHARED_HOME, ignore_errors=True)
