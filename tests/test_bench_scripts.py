"""The benchmarks in bench/ still run: each, at its smallest size, prints its figures.

They are run on demand for their figures (never timed here); this only keeps them working
as the code under them changes (the input roots once made every screen bench fail).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
EXPECTED = {
    "g2_screen.py": ["ratio atomforge / bare:", "CPU a round, atomforge:"],
    "prefect_floor.py": ["run-shaped flow of no-op tasks", "task run", "artifact created"],
}
"""What a script prints that says it ran, where it is not the ratio line alone."""


@pytest.mark.parametrize(
    "script, args",
    [
        ("g2_screen.py", ["--limit", "2", "--copies", "2", "--repeat", "1"]),
        ("prefect_floor.py", ["--repeat", "1", "--count", "2"]),
        ("engine_launch.py", ["--n", "5", "--repeat", "1"]),
        ("qe_screen.py", ["--ecutwfc", "12", "--kpts", "1", "--repeat", "1"]),
        ("chgnet_screen.py", ["--n", "2", "--steps", "3", "--repeat", "1"]),
    ],
)
def test_benchmark_runs_at_its_smallest_size_and_prints_its_figures(tmp_path, script, args):
    env = os.environ | {"ATOMFORGE_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    expected = EXPECTED.get(script, ["ratio atomforge / bare:"])
    assert all(line in out.stdout for line in expected), out.stdout
