"""Benchmark: the ``atomforge run`` command as a whole process, against the bare xtb binary.

Times ``atomforge run STRUCTURE --engine xtb`` as a person or a script runs it, each a
fresh process: the first command on the machine (a new atomforge home and cache folder:
it starts the local server, which creates its database by Prefect's migrations and keeps
a copy), ``atomforge server prepare`` as ``.ci/setup`` runs it (another new cache folder)
and the first command after it, the first command on another new home (its server's
database is the first one's copy), the first after ``atomforge server stop`` (it starts
the server on the existing database), then ``--warm`` commands against the running
server; and, in the
same run, the ``xtb`` program optimizing the same file the way atomforge calls it. Prints
each figure, the warm median and its ratio to xtb's median. ``--embedded`` also times
commands with ``ATOMFORGE_LOCAL_SERVER=false`` (Prefect's embedded server per command).
The server it starts is stopped at the end. Run:
``.venv/bin/python bench/cli_command.py [--structure examples/water.xyz] [--warm N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
ATOMFORGE = str(Path(sys.executable).with_name("atomforge"))


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """Run ``argv`` to completion; return its wall time in seconds (exit 0 required)."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed


def bare_xtb(structure: Path, scratch: Path) -> float:
    """Optimize ``structure`` with xtb as atomforge calls it, in a fresh folder; return s."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    shutil.copy(structure, folder / "input.xyz")
    argv = ["xtb", "input.xyz", "--gfn", "2", "--json", "--chrg", "0", "--uhf", "0"]
    argv += ["--opt", "normal", "--cycles", "500"]
    return timed(argv, {**os.environ, "OMP_NUM_THREADS": "1"}, folder)


def main() -> None:
    """Time the command and the bare binary; print the figures and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", type=Path, default=REPO / "examples" / "water.xyz")
    parser.add_argument("--warm", type=int, default=9, help="commands after the first")
    parser.add_argument(
        "--embedded", type=int, default=0, help="also time this many commands without it"
    )
    args = parser.parse_args()
    structure = args.structure.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="atomforge-bench-cli-"))
    first = {
        **os.environ,
        "ATOMFORGE_HOME": str(scratch / "first"),
        "ATOMFORGE_CACHE_DIR": str(scratch / "cache"),
    }
    for name in ("PREFECT_API_URL", "ATOMFORGE_LOCAL_SERVER"):
        first.pop(name, None)
    env = first | {"ATOMFORGE_HOME": str(scratch / "home")}
    prepared = first | {
        "ATOMFORGE_HOME": str(scratch / "after-setup"),
        "ATOMFORGE_CACHE_DIR": str(scratch / "prepared-cache"),
    }
    command = [ATOMFORGE, "run", str(structure), "--engine", "xtb"]
    try:
        migrated = timed(command, first, REPO)
        timed([ATOMFORGE, "server", "stop"], first, REPO)
        prepare = timed([ATOMFORGE, "server", "prepare"], prepared, REPO)
        after_prepare = timed(command, prepared, REPO)
        timed([ATOMFORGE, "server", "stop"], prepared, REPO)
        new_home = timed(command, env, REPO)
        timed([ATOMFORGE, "server", "stop"], env, REPO)
        restart = timed(command, env, REPO)
        warm, bare = [], []
        for _ in range(args.warm):
            warm.append(timed(command, env, REPO))
            bare.append(bare_xtb(structure, scratch))
        embedded = [
            timed(command, env | {"ATOMFORGE_LOCAL_SERVER": "false"}, REPO)
            for _ in range(args.embedded)
        ]
    finally:
        for each in (first, env, prepared):
            subprocess.run([ATOMFORGE, "server", "stop"], env=each, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"atomforge run {structure.name} --engine xtb, whole process, {os.cpu_count()} cores")
    print(f"  first command on the machine, new home:  {migrated:7.2f} s")
    print(f"  first command, new atomforge home:       {new_home:7.2f} s")
    print(f"  first command, server stopped before:    {restart:7.2f} s")
    print(f"  `atomforge server prepare` (.ci/setup):  {prepare:7.2f} s")
    print(f"  first command after it, new home:        {after_prepare:7.2f} s")
    print(
        f"  next {len(warm)} commands: median {median(warm):.2f} s  (min {min(warm):.2f}, "
        f"max {max(warm):.2f})"
    )
    if embedded:
        print(f"  embedded server per command: median {median(embedded):.2f} s")
    print(f"  bare xtb, same file: median {median(bare) * 1000:.0f} ms")
    print(f"  warm command / bare xtb: {median(warm) / median(bare):.0f}x")


if __name__ == "__main__":
    main()
