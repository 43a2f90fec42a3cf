"""Benchmark: what starting one engine process costs, through atomforge and bare.

Starts ``/bin/true`` ``--n`` times in a row through :func:`atomforge.engines.process.run_process`
(a session of its own, ``setpriv --pdeathsig``, a pid record, the reaper told, output to a
log file read back, a pidfd wait), through a bare ``subprocess.run`` in a session of its
own, and through the same under ``setpriv --pdeathsig KILL`` (where util-linux has it),
alternating ``--repeat`` rounds, and prints the median wall time and CPU time
(this process's, and the started processes') of one start each way. Run:
``.venv/bin/python bench/engine_launch.py [--n N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

COMMAND = ["/bin/true"]


def cpu_now() -> tuple[float, float]:
    """Return the CPU seconds used so far by this process and by the children it waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, waited.ru_utime + waited.ru_stime


def per_start(start: Callable[[], object], n: int) -> tuple[float, float, float]:
    """Return the wall, own CPU and children's CPU milliseconds of one of ``n`` starts."""
    (own, children), started = cpu_now(), time.perf_counter()
    for _ in range(n):
        start()
    wall = time.perf_counter() - started
    own_after, children_after = cpu_now()
    return tuple(1000 * value / n for value in (wall, own_after - own, children_after - children))


def main() -> None:
    """Time both ways in alternating rounds and print the medians of one start."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="starts in a round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; medians are reported")
    args = parser.parse_args()

    from atomforge.engines.process import run_process

    folder = Path(tempfile.mkdtemp(prefix="engine-launch-"))

    def through_atomforge() -> object:
        return run_process(
            COMMAND,
            cwd=folder,
            timeout=60,
            pid_dir=folder / "pids",
            stop_file=folder / "stop",
            log=lambda text: None,
        )

    def bare() -> object:
        return subprocess.run(
            COMMAND, cwd=folder, stdout=subprocess.DEVNULL, start_new_session=True, check=True
        )

    def bare_setpriv() -> object:
        return subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", *COMMAND],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            check=True,
        )

    ways = {"bare subprocess.run": bare, "atomforge run_process": through_atomforge}
    setpriv = shutil.which("setpriv")
    if setpriv:
        ways["bare, under setpriv"] = bare_setpriv
    rounds: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
    for start in ways.values():
        start()  # warm-up: the reaper starts beside the first engine
    for _ in range(args.repeat):
        for name, start in ways.items():
            rounds[name].append(per_start(start, args.n))
    print(f"{' '.join(COMMAND)}, {args.n} starts a round, median of {args.repeat} rounds")
    print(f"{'one start':24s} {'wall ms':>8s} {'own CPU ms':>11s} {'child CPU ms':>13s}")
    figures = {name: [median(column) for column in zip(*rows)] for name, rows in rounds.items()}
    for name, (wall, own, children) in figures.items():
        print(f"{name:24s} {wall:8.2f} {own:11.2f} {children:13.2f}")
    bare_cpu, forge_cpu = (sum(figures[name][1:]) for name in list(ways)[:2])
    print(f"ratio atomforge / bare:  {forge_cpu / bare_cpu:8.2f} (CPU of one start)")


if __name__ == "__main__":
    sys.exit(main())
