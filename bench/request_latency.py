"""Benchmark: single ``simulate`` requests through the service, submission to Completed.

Brings ``atomforge service up`` in a temporary folder (PostgreSQL, server with auth, the
process pool, the warm consumer, the warm executor, the worker; reuse of earlier results
off, so that each
request computes) and submits ``simulate`` of water with xtb (``--engine``: another)
through the deployment with ``run_deployment(..., timeout=0)``, the way a job service is
used:

- one at a time (``--sequential`` requests, each waited for): p50 and p95 of submission
  to Completed (the Completed state's timestamp), and the median of its stages: waiting
  for the worker (Scheduled to Pending), starting (Pending to Running), the flow (Running
  to Completed);
- ``--burst`` requests submitted at once: throughput (requests over the time from the
  first submission to the last completion), p50, p95 and the slowest, runs not Completed,
  and the most xtb processes (and flow-run processes) seen at once.

Each measurement also prints the CPU seconds a request cost: the service's, by process,
and the whole machine's (every process: the service, its engines, this benchmark's
client), with the most requests a second the machine's cores allow at that cost.

Each is measured with the runs the warm consumer takes (no job variables: the default)
and, in the same run (``--launchers``), with runs the worker starts through a ``command``
job variable of their own: the warm executor's client (the worker's path before the
consumer), ``python -m prefect.engine`` (the engine started for each run), and one at a
time also Prefect's own launcher (``command`` null: its workspace supervisor, then the
engine). ``--burst`` is the consumer's, ``--baseline-burst`` each other launcher's. Prints
a table and the ratios against the consumer. Run: ``.venv/bin/python
bench/request_latency.py [--sequential 10] [--burst 100] [--baseline-burst 100]
[--engine xtb]``.

The batched deployment (``simulate/batched``, served by the batcher) is measured with
``--batched N`` (N requests submitted at once: throughput, p50, p95, the slowest, the
batch runs they were computed in, the service's CPU per request, the batcher's
included) and ``--batched-sequential M`` (one at a time, each waited for: p50, p95 and
the stages: waiting to be claimed, claimed to Running (the collection window, checks,
the batch's creation), Running to the final state). These follow the runs with one
query a second (0.2 s one at a time) for those that became final, and read their states
afterwards, so that the measuring adds little to the server's work. For example
``--sequential 0 --burst 0 --baseline-burst 0 --batched 100 --batched-sequential 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from statistics import median, quantiles

import psutil

REPO = Path(__file__).resolve().parents[1]
WATER = REPO / "examples" / "water.xyz"
DEPLOYMENT = "simulate/simulate"
BATCHED = "simulate/batched"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
LAUNCHERS = {
    "consumer": {},
    "warm": {"command": "WARM_COMMAND"},
    "engine": {"command": f"{sys.executable} -m prefect.engine"},
    "prefect": {"command": None},
}
"""The job variables of each way of starting a run: none (the warm consumer takes it),
the warm executor's client (the pool's default command, given as the run's own: the
worker starts it), the engine command, Prefect's own launcher. ``WARM_COMMAND`` is
replaced by the service's (see :func:`job_variables`)."""


def job_variables(name: str, service_dir: Path) -> dict:
    """Return the job variables of launcher ``name`` for the service in ``service_dir``."""
    from atomforge.deployments.service import ServiceSettings, warm_command

    command = warm_command(ServiceSettings(dir=service_dir))
    return {k: command if v == "WARM_COMMAND" else v for k, v in LAUNCHERS[name].items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _service(env: dict[str, str], action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "atomforge.deployments.service", action],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )


@contextmanager
def service():
    """Bring the service up in a temporary folder on free ports; yield its client
    environment; bring it down and remove the folder."""
    folder = Path(tempfile.mkdtemp(prefix="atomforge-bench-service-"))
    folder.chmod(0o755)
    env = os.environ | {
        "ATOMFORGE_SERVICE_DIR": str(folder / "service"),
        "ATOMFORGE_SERVICE_PORT": str(_free_port()),
        "ATOMFORGE_SERVICE_POSTGRES_PORT": str(_free_port()),
        "ATOMFORGE_SERVICE_WORKER_HEALTH_PORT": str(_free_port()),
        "ATOMFORGE_HOME": str(folder / "atomforge"),
        "ATOMFORGE_REUSE": "false",
        "PREFECT_HOME": str(folder / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    try:
        started = _service(env, "up")
        if started.returncode != 0:
            sys.exit(f"service up failed:\n{started.stdout}{started.stderr}")
        for line in _service(env, "env").stdout.splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = value.strip("'")
        yield env
    finally:
        _service(env, "down")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Request:
    """One submitted request: when it was submitted, its flow run, how it ended."""

    submitted: float
    flow_run_id: object = None
    final: str = ""
    batch: str = ""
    created: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def latency(self) -> float:
        """Return seconds from submission to the final state."""
        return self.stages["final"] - self.submitted


class ProcessPeak:
    """Counts, in a thread, the most xtb processes of the service (working under its
    atomforge home) seen at once, every 0.1 s: a lower bound, as an xtb run of water
    lasts about 20 ms."""

    def __init__(self, home: Path) -> None:
        self.home = str(home)
        self.xtb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            xtb = 0
            for proc in psutil.process_iter(["name"]):
                if proc.info["name"] == "xtb":
                    with contextlib.suppress(psutil.Error):
                        xtb += proc.cwd().startswith(self.home)
            self.xtb = max(self.xtb, xtb)

    def __enter__(self) -> ProcessPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


PARTS = {
    "server": "server.pid",
    "postgres": "postgres/postmaster.pid",
    "worker": "worker.pid",
    "warm": "warm.pid",
    "batcher": "batcher.pid",
    "consumer": "consumer.pid",
}
"""The service's processes, by the file that holds the pid of each (the worker's part
holds its runs' processes when they start without the warm executor)."""


def service_cpu(service_dir: Path) -> dict[str, float]:
    """Return the CPU seconds used so far by each part of the service, with its children
    and the children it has waited for (flow runs, engines): the work requests cost the
    machine, whatever else runs on it."""
    used = dict.fromkeys(PARTS, 0.0)
    for part, name in PARTS.items():
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            root = psutil.Process(int((service_dir / name).read_text().split()[0]))
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    used[part] += times.user + times.system
                    used[part] += times.children_user + times.children_system
    return used


def cpu_per_request(before: dict[str, float], after: dict[str, float], n: int) -> dict:
    """Return each part's CPU seconds per request between two :func:`service_cpu`."""
    return {part: (after[part] - before[part]) / n for part in before}


def machine_busy() -> float:
    """Return the CPU seconds the whole machine has been busy so far, all cores and every
    process together (the service, its engines, this benchmark's own client)."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq + times.steal


class Meter:
    """What one measurement costs from its start: the service's CPU by part, the whole
    machine's busy CPU, and the most xtb processes seen at once."""

    def __init__(self, service_dir: Path) -> None:
        self.service_dir = service_dir
        self.cpu = service_cpu(service_dir)
        self.busy = machine_busy()
        self.peak = ProcessPeak(service_dir.parent / "atomforge")

    def phase(self, requests: list[Request]) -> Phase:
        """Return the measurement of ``requests``, ended now."""
        n = len(requests)
        parts = cpu_per_request(self.cpu, service_cpu(self.service_dir), n)
        return Phase(requests, self.peak.xtb, parts, (machine_busy() - self.busy) / n)


@dataclass
class Phase:
    """The requests of one measurement, the most xtb processes seen, the service's CPU
    seconds per request by part, and the whole machine's."""

    requests: list[Request]
    xtb: int
    parts: dict[str, float]
    machine: float

    @property
    def cpu(self) -> float:
        """Return the service's CPU seconds per request."""
        return sum(self.parts.values())

    def cpu_line(self, name: str) -> str:
        """Return the CPU per request of each part of the service, and of the machine with
        the rate its cores allow at that cost, as a line."""
        parts = ", ".join(f"{part} {seconds:.2f}" for part, seconds in self.parts.items())
        cores = os.cpu_count() or 1
        ceiling = f"{cores / self.machine:.1f}/s" if self.machine > 0 else "-"
        return (
            f"  {name}: CPU s per request: {parts}; the whole machine {self.machine:.2f} "
            f"(at most {ceiling} on {cores} cores)"
        )


async def _submit(
    client, job_variables: dict, engine: str, deployment: str = DEPLOYMENT
) -> Request:
    from prefect.deployments import run_deployment

    request = Request(submitted=time.time())
    parameters = {"source": {"path": str(WATER)}, "parameters": {"engine": engine}}
    run = await run_deployment(
        deployment,
        parameters=parameters,
        job_variables=job_variables,
        timeout=0,
        client=client,
    )
    request.flow_run_id = run.id
    request.created = time.time()
    return request


async def _settle(client, requests: list[Request], poll: float) -> None:
    """Wait until every request's run is final; record its final state and stages."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    waiting = {r.flow_run_id: r for r in requests}
    while waiting:
        await asyncio.sleep(poll)
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(waiting)))
        )
        for run in runs:
            if run.state is not None and run.state.type.value in FINAL:
                request = waiting.pop(run.id)
                request.final = run.state.type.value
                states = await client.read_flow_run_states(run.id)
                for state in states:
                    request.stages.setdefault(state.type.value, _seconds(state.timestamp))
                request.stages["final"] = _seconds(run.state.timestamp)


def _seconds(stamp: datetime) -> float:
    return stamp.timestamp()


async def sequential(client, job_variables: dict, n: int, service_dir: Path, engine: str) -> Phase:
    """Submit ``n`` requests one after the other, each once the last is final."""
    done = []
    meter = Meter(service_dir)
    with meter.peak:
        for _ in range(n):
            request = await _submit(client, job_variables, engine)
            await _settle(client, [request], poll=0.1)
            done.append(request)
    return meter.phase(done)


async def burst(client, job_variables: dict, n: int, service_dir: Path, engine: str) -> Phase:
    """Submit ``n`` requests at once and wait for all of them."""
    meter = Meter(service_dir)
    with meter.peak:
        requests = await asyncio.gather(*(_submit(client, job_variables, engine) for _ in range(n)))
        await _settle(client, list(requests), poll=0.25)
    return meter.phase(list(requests))


async def _settle_quietly(client, requests: list[Request], poll: float = 1.0) -> None:
    """Wait until every request's run is final, asking only for the runs that became
    final (one query a poll: the final states' timestamps, not the polls, time the
    runs); then record each one's final state and its stages, and the
    batch run it was computed in (named by its Running state's message)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    waiting = {r.flow_run_id: r for r in requests}
    final = FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(FINAL)))
    while waiting:
        await asyncio.sleep(poll)
        ids = FlowRunFilterId(any_=list(waiting))
        for run in await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=ids, state=final)):
            request = waiting.pop(run.id)
            request.final = run.state.type.value
            request.stages["final"] = _seconds(run.state.timestamp)
    for request in requests:
        for state in await client.read_flow_run_states(request.flow_run_id):
            request.stages.setdefault(state.type.value, _seconds(state.timestamp))
            if state.type.value == "RUNNING" and state.message:
                request.batch = state.message.split()[2] if "in batch" in state.message else ""


async def batched_burst(client, n: int, service_dir: Path, engine: str) -> Phase:
    """Submit ``n`` requests of the batched deployment at once and wait for all."""
    meter = Meter(service_dir)
    with meter.peak:
        submit = (_submit(client, {}, engine, BATCHED) for _ in range(n))
        requests = list(await asyncio.gather(*submit))
        await _settle_quietly(client, requests)
    return meter.phase(requests)


async def batched_sequential(client, n: int, service_dir: Path, engine: str) -> Phase:
    """Submit ``n`` requests of the batched deployment one after the other."""
    done = []
    meter = Meter(service_dir)
    with meter.peak:
        for _ in range(n):
            request = await _submit(client, {}, engine, BATCHED)
            await _settle_quietly(client, [request], poll=0.2)
            done.append(request)
    return meter.phase(done)


def report_batched(burst_phase: Phase | None, one_phase: Phase | None) -> None:
    """Print the batched deployment's throughput, latency, batches and CPU per request."""
    print(f"\nbatched deployment ({BATCHED})")
    print(
        f"{'mode':13} {'n':>4} {'runs/s':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
        f"{'claim':>6} {'start':>6} {'batch':>6} {'batches':>7} {'cpu s':>6} {'not ok':>6}"
    )
    for name, phase in (("at once", burst_phase), ("one at a time", one_phase)):
        if phase is None:
            continue
        requests = phase.requests
        latencies = [r.latency for r in requests]
        span = max(r.stages["final"] for r in requests) - min(r.submitted for r in requests)
        batches = len({r.batch for r in requests if r.batch})
        print(
            f"{name:13} {len(requests):4d} {len(requests) / span:7.2f} "
            f"{_pct(latencies, 50):7.2f} {_pct(latencies, 95):7.2f} {max(latencies):7.2f} "
            f"{_stage(requests, 'SCHEDULED', 'PENDING'):6.2f} "
            f"{_stage(requests, 'PENDING', 'RUNNING'):6.2f} "
            f"{_stage(requests, 'RUNNING', 'COMPLETED'):6.2f} {batches:7d} {phase.cpu:6.2f} "
            f"{_check(requests, name):6d}"
        )
    for name, phase in (("at once", burst_phase), ("one at a time", one_phase)):
        if phase is not None:
            print(phase.cpu_line(name))
    if burst_phase is not None:
        requests = burst_phase.requests
        created = max(r.created for r in requests) - min(r.submitted for r in requests)
        print(f"  at once: the last of the {len(requests)} run_deployment calls returned after")
        print(f"  {created:.1f} s (creating the requests' flow runs)")
    print("(claim: Scheduled to Pending; start: Pending to Running (the window, checks, the")
    print(" batch run's creation); batch: Running to Completed; medians. runs/s: requests over")
    print(" the time from the first submission to the last final state)")


def _pct(values: list[float], q: int) -> float:
    return quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _stage(requests: list[Request], start: str, end: str) -> float:
    spans = [r.stages[end] - r.stages[start] for r in requests if {start, end} <= r.stages.keys()]
    return median(spans) if spans else float("nan")


def _most_running(requests: list[Request]) -> int:
    """Return the most runs Running at once, from their states' timestamps."""
    events = sorted(
        (t, step)
        for r in requests
        if "RUNNING" in r.stages
        for t, step in ((r.stages["RUNNING"], 1), (r.stages["final"], -1))
    )
    most = running = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def _check(requests: list[Request], label: str) -> int:
    failed = [r for r in requests if r.final != "COMPLETED"]
    for r in failed[:3]:
        print(f"  {label}: run {r.flow_run_id} ended {r.final}", file=sys.stderr)
    return len(failed)


def report_sequential(rows: dict[str, Phase]) -> None:
    """Print p50/p95, the stages and the CPU per request of each launcher, one at a time."""
    print(f"\none at a time ({len(next(iter(rows.values())).requests)} requests each)")
    print(
        f"{'launcher':9} {'p50 s':>7} {'p95 s':>7} {'wait':>6} {'start':>6} {'flow':>6} "
        f"{'cpu s':>6} {'not ok':>6}"
    )
    for name, phase in rows.items():
        requests = phase.requests
        latencies = [r.latency for r in requests]
        print(
            f"{name:9} {_pct(latencies, 50):7.2f} {_pct(latencies, 95):7.2f} "
            f"{_stage(requests, 'SCHEDULED', 'PENDING'):6.2f} "
            f"{_stage(requests, 'PENDING', 'RUNNING'):6.2f} "
            f"{_stage(requests, 'RUNNING', 'COMPLETED'):6.2f} {phase.cpu:6.2f} "
            f"{_check(requests, name):6d}"
        )
    for name, phase in rows.items():
        print(phase.cpu_line(name))
    first = next(iter(rows))
    p50 = {name: _pct([r.latency for r in rows[name].requests], 50) for name in rows}
    ratios = [f"{name} / {first}: {p50[name] / p50[first]:.1f}x" for name in rows if name != first]
    if ratios:
        print("p50 " + ", ".join(ratios))


def report_burst(rows: dict[str, Phase]) -> None:
    """Print throughput, latency, process peaks and CPU per request of each burst."""
    print("\nsubmitted at once")
    print(
        f"{'launcher':9} {'n':>4} {'runs/s':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
        f"{'xtb':>4} {'runs':>5} {'cpu s':>6} {'not ok':>6}"
    )
    throughput = {}
    for name, phase in rows.items():
        requests = phase.requests
        latencies = [r.latency for r in requests]
        span = max(r.stages["final"] for r in requests) - min(r.submitted for r in requests)
        throughput[name] = len(requests) / span
        print(
            f"{name:9} {len(requests):4d} {throughput[name]:7.2f} {_pct(latencies, 50):7.1f} "
            f"{_pct(latencies, 95):7.1f} {max(latencies):7.1f} {phase.xtb:4d} "
            f"{_most_running(requests):5d} {phase.cpu:6.2f} {_check(requests, name):6d}"
        )
    for name, phase in rows.items():
        print(phase.cpu_line(name))
    first = next(iter(rows))
    for name in [n for n in rows if n != first]:
        print(f"throughput {first} / {name}: {throughput[first] / throughput[name]:.1f}x")
    print("(xtb: most xtb processes seen at once; runs: most flow runs Running at once; cpu s:")
    print(" CPU seconds the service's processes used per request)")


def executor_notes(service_dir: Path) -> str:
    """Return what the warm executor's log says of runs it did not take (refused
    requests, restarts after a code change): those runs started their own engine."""
    log = (service_dir / "warm.log").read_text()
    forked, refused = log.count(": pid "), log.count("refused a request")
    return f"warm executor: {forked} runs forked, {refused} refused, " + (
        f"{log.count('starting anew')} restarts (atomforge's code changed)"
    )


def batcher_notes(service_dir: Path) -> str:
    """Return what the batcher's log says of its batches: how many, their sizes, and how
    long each batch run took to start, compute and end its requests."""
    lines = (service_dir / "batcher.log").read_text().splitlines()
    sizes = [
        int(line.split()[0])
        for line in lines
        if " request(s), " in line and line.split()[0].isdigit()
    ]
    if not sizes:
        return "batcher: no batch"
    timings = [f"  {line}" for line in lines if line.startswith("batch ") and "starting" in line]
    summary = f"batcher: {len(sizes)} batches of {min(sizes)}-{max(sizes)} requests (mean " + (
        f"{sum(sizes) / len(sizes):.1f}), counting the warm-up"
    )
    return "\n".join([summary, *timings])


async def measure(args: argparse.Namespace, service_dir: Path) -> None:
    """Run the requests against the service of ``PREFECT_API_URL`` and print the tables."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        engine = args.engine
        await sequential(client, {}, 2, service_dir, engine)
        if args.batched or args.batched_sequential:
            await batched_sequential(client, 2, service_dir, engine)
            one = None
            if args.batched_sequential:
                one = await batched_sequential(client, args.batched_sequential, service_dir, engine)
            at_once = (
                await batched_burst(client, args.batched, service_dir, engine)
                if args.batched
                else None
            )
            report_batched(at_once, one)
        rows = {}
        for name in args.launchers:
            if args.sequential:
                variables = job_variables(name, service_dir)
                rows[name] = await sequential(
                    client, variables, args.sequential, service_dir, engine
                )
        if rows:
            report_sequential(rows)
        bursts = {}
        for index, name in enumerate(n for n in args.launchers if n != "prefect"):
            size = args.burst if index == 0 else args.baseline_burst
            if size:
                variables = job_variables(name, service_dir)
                bursts[name] = await burst(client, variables, size, service_dir, engine)
        if bursts:
            report_burst(bursts)


def main() -> None:
    """Bring a service up, measure, print; bring it down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=10)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--baseline-burst", type=int, default=100)
    parser.add_argument(
        "--launchers", default="consumer,warm,engine,prefect", type=lambda s: s.split(",")
    )
    parser.add_argument("--engine", default="xtb", help="the engine each request runs")
    parser.add_argument("--batched", type=int, default=0, help="requests at once, batched")
    parser.add_argument(
        "--batched-sequential", type=int, default=0, help="batched requests one at a time"
    )
    args = parser.parse_args()
    print(
        f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f} at start"
    )
    with service() as env:
        os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")})
        os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
        service_dir = Path(env["ATOMFORGE_SERVICE_DIR"])
        asyncio.run(measure(args, service_dir))
        print(executor_notes(service_dir))
        if args.batched or args.batched_sequential:
            print(batcher_notes(service_dir))
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
