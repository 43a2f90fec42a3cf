"""Benchmark: the same screen on the default LocalCluster and on a separately started Dask
scheduler with worker processes on loopback.

Starts ``dask scheduler`` and ``dask worker --nworkers N --nthreads 1`` (N: ``--workers``,
the machine's cores by default), then screens the closed-shell G2 molecules (``--copies``
rattled copies of each, xtb optimization) ``--repeat`` times each way, alternating: once
with ``ATOMFORGE_DASK_ADDRESS`` unset (a LocalCluster of N one-thread workers in the flow's
process) and once with it set to the scheduler, after one screen each way that warms them
up (the worker processes import atomforge, Prefect and ASE on their first task; that first
screen's time is printed too). Prints the medians and their ratio. Run:
``.venv/bin/python bench/remote_dask.py [--copies 3] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median

from ase.io import write

sys.path.insert(0, str(Path(__file__).parent))
from g2_screen import closed_shell_g2, rattled_copies

DASK = str(Path(sys.executable).with_name("dask"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def loopback_cluster(workers: int) -> Iterator[str]:
    """Start a ``dask scheduler`` and ``workers`` one-thread worker processes on loopback;
    yield the scheduler's address once they joined; stop them."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = [DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]]
    worker = [DASK, "worker", address, "--nworkers", str(workers), "--nthreads", "1"]
    procs = [subprocess.Popen([*scheduler, "--dashboard-address", ":0"], **quiet)]
    try:
        procs.append(subprocess.Popen([*worker, "--no-dashboard"], **quiet))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def timed_screen(folder: Path, address: str | None) -> tuple[float, int]:
    """Screen ``folder`` on the scheduler at ``address`` (None: a LocalCluster); return the
    wall time and the number of structures completed."""
    from atomforge.flows.models import StructureSource, make_parameters
    from atomforge.flows.screen import screen

    if address:
        os.environ["ATOMFORGE_DASK_ADDRESS"] = address
    else:
        os.environ.pop("ATOMFORGE_DASK_ADDRESS", None)
    started = time.perf_counter()
    report = asyncio.run(screen(StructureSource(path=str(folder)), make_parameters(engine="xtb")))
    return time.perf_counter() - started, report.n_completed


def main() -> None:
    """Run both ways ``--repeat`` times, alternating, and print the median figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3, help="rattled copies of each molecule")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    args = parser.parse_args()
    os.environ["ATOMFORGE_DASK_WORKERS"] = str(args.workers)
    os.environ["ATOMFORGE_REUSE"] = "false"  # every round computes
    os.environ.setdefault("ATOMFORGE_HOME", tempfile.mkdtemp(prefix="atomforge-bench-"))
    home = Path(os.environ["ATOMFORGE_HOME"])
    home.mkdir(parents=True, exist_ok=True)

    from atomforge.flows import embedded_server
    from atomforge.flows.cli import set_embedded_prefect_defaults

    set_embedded_prefect_defaults()  # as the command sets them
    embedded_server.start()  # one API for the flow and every worker process
    molecules = rattled_copies(closed_shell_g2(), args.copies)
    folder = Path(tempfile.mkdtemp(prefix="g2-", dir=home))
    for name, atoms in molecules:
        write(folder / f"{name}.xyz", atoms, format="xyz")

    times: dict[str, list[float]] = {"LocalCluster": [], "dask scheduler": []}
    with loopback_cluster(args.workers) as address:
        timed_screen(folder, None)  # warm-up: imports, the embedded API
        cold, _ = timed_screen(folder, address)  # the worker processes import on first use
        print(f"  dask scheduler, first screen (workers importing): {cold:.2f} s")
        for _ in range(args.repeat):
            for label, target in (("LocalCluster", None), ("dask scheduler", address)):
                seconds, completed = timed_screen(folder, target)
                times[label].append(seconds)
                print(f"  {label}: {seconds:.2f} s ({completed} of {len(molecules)} completed)")
    local, remote = (median(times[label]) for label in times)
    n = len(molecules)
    print(f"{n} structures (closed-shell G2 x {args.copies}), xtb, {args.workers} workers")
    print(f"median of {args.repeat} rounds (min in brackets)")
    for label, seconds in times.items():
        print(f"{label + ':':16} {median(seconds):7.2f} s [{min(seconds):.2f}]")
    print(f"ratio scheduler / LocalCluster: {remote / local:.3f}")


if __name__ == "__main__":
    sys.exit(main())
