"""Batched requests for real: the service (PostgreSQL, Prefect server with auth, the
batcher) and xtb. Requests of ``simulate/batched`` submitted at once are computed together
in batch runs, and each ends with its own state, result document, artifact and Prefect
result; a bad one fails alone; one cancelled before it runs is never computed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, WATER_XYZ
from tests.prefect_server import (
    api_get,
    api_post,
    create_deployment_run,
    running_service,
    service,
    wait_final,
)

pytestmark = pytest.mark.e2e

BATCHED = "simulate/batched"
GOOD = 5
"""Good requests submitted at once with the bad ones."""

SUBMIT = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from datetime import datetime, timedelta, timezone
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    async def submit(client, spec):
        when = None
        if spec.get("delay"):
            when = datetime.now(timezone.utc) + timedelta(seconds=spec["delay"])
        run = await run_deployment(
            spec["deployment"], parameters=spec["parameters"], timeout=0,
            scheduled_time=when, client=client,
        )
        if spec.get("cancel"):
            await client.set_flow_run_state(run.id, Cancelling(message="changed my mind"))
        return run.id

    async def main(specs):
        async with get_client() as client:
            await client.read_flow_runs(limit=1)  # fetches the CSRF token once
            ids = await asyncio.gather(*(submit(client, spec) for spec in specs))
            not_before = time.monotonic() + max(spec.get("delay", 0) for spec in specs) + 3
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                runs = [await client.read_flow_run(i) for i in ids]
                if all(r.state.is_final() for r in runs) and time.monotonic() > not_before:
                    break
                await asyncio.sleep(0.5)
            out = []
            for run in runs:
                result = None
                if run.state.is_completed():
                    document = await run.state.result()
                    result = [type(document).__name__, document.energy_eV]
                out.append(
                    {"id": str(run.id), "name": run.name, "state": run.state.type.value,
                     "message": run.state.message, "result": result}
                )
            print(json.dumps(out))

    asyncio.run(main(json.loads(sys.argv[1])))
    """
)


def _submit(env: dict[str, str], specs: list[dict]) -> list[dict]:
    """Submit the requests ``specs`` at once; return each one's final state, message and
    Prefect result (type and energy) once every one is final."""
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT, json.dumps(specs)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _request(path: Path, **parameters) -> dict:
    """Return a request of the batched deployment computing ``path`` with xtb."""
    return {
        "deployment": BATCHED,
        "parameters": {
            "source": {"path": str(path)},
            "parameters": {"engine": "xtb", **parameters},
        },
    }


@pytest.fixture(scope="module")
def batch_service():
    """The service with its batcher; yield (client environment, atomforge home)."""
    with running_service() as (env, _):
        yield env, Path(env["ATOMFORGE_HOME"])


@pytest.fixture(scope="module")
def burst(batch_service, tmp_path_factory):
    """Submit at once: good water requests, one whose structure is bad, one whose
    parameters are bad, one due in 3 s that is cancelled at once and one due in 3 s that
    is not, and a ``simulate/simulate`` run of the same water through the process worker;
    return the environment, the atomforge home and each run's outcome by its role."""
    env, home = batch_service
    folder = tmp_path_factory.mktemp("requests")
    water, bad = folder / "water.xyz", folder / "clash.xyz"
    water.write_text(WATER_XYZ)
    bad.write_text("3\nclash\nO 0 0 0\nH 0 0 0\nH 0 0.76 0.6\n")
    roles = {
        "bad structure": _request(bad),
        "bad parameters": _request(water, kind="no-such-kind"),
        "cancelled": {**_request(water), "delay": 3, "cancel": True},
        "later": {**_request(water), "delay": 3},
        "simulate": {**_request(water), "deployment": "simulate/simulate"},
    }
    specs = [_request(water) for _ in range(GOOD)] + list(roles.values())
    outcomes = _submit(env, specs)
    return {
        "env": env,
        "home": home,
        "good": outcomes[:GOOD],
        **dict(zip(roles, outcomes[GOOD:])),
    }


def _prefix(outcome: dict) -> str:
    """Return how a request's structure is named in its batch run: its id's first eight
    hex digits."""
    return outcome["id"].replace("-", "")[:8]


def _document(home: Path, flow_run_id: str) -> dict:
    """Return the one result document stored under ``flow_run_id``."""
    documents = [p for p in (home / "results" / flow_run_id).glob("*.json") if p.name != "run.json"]
    assert len(documents) == 1, documents
    return json.loads(documents[0].read_text())


def test_requests_at_once_complete_each_with_its_own_result(burst):
    env, home, good, simulate = burst["env"], burst["home"], burst["good"], burst["simulate"]
    assert simulate["state"] == "COMPLETED", simulate
    reference = _document(home, simulate["id"])["energy_eV"]
    batches = set()
    for outcome in good:
        assert outcome["state"] == "COMPLETED", outcome
        document = _document(home, outcome["id"])
        assert document["flow_run_id"] == outcome["id"]
        assert document["flow_name"] == "simulate"
        assert document["name"] == "water" and document["status"] == "completed"
        assert document["energy_eV"] == pytest.approx(reference, abs=1e-6)
        assert outcome["result"] == ["StructureResult", document["energy_eV"]]
        assert "O " in document["input_structure"]
        run = json.loads((home / "results" / outcome["id"] / "run.json").read_text())
        assert run["state"] == "Completed" and run["result_ids"] == [document["id"]]
        batch_run_id, batch_result = document["reused_from"].split("/")
        assert batch_result.endswith(f"{_prefix(outcome)}-water"), batch_result
        batches.add(batch_run_id)
        ours = {"flow_run_id": {"any_": [outcome["id"]]}, "type": {"any_": ["markdown"]}}
        artifacts = api_post(env, "/artifacts/filter", {"artifacts": ours})
        assert len(artifacts) == 1 and batch_run_id in artifacts[0]["data"], artifacts
        assert f"{document['energy_eV']:.6f} eV" in artifacts[0]["data"]
    assert len(batches) < GOOD, "requests submitted at once share batch runs"
    for batch_run_id in batches:
        batch = api_get(env, f"/flow_runs/{batch_run_id}")
        assert batch["state"]["type"] == "COMPLETED", batch["state"]
        assert batch["name"].startswith("batch of ") and "batched" in batch["tags"]
        stored = (home / "results" / batch_run_id).glob("0*.json")
        names = {path.stem.split("-", 1)[1] for path in stored}
        ours = {f"{_prefix(o)}-water" for o in [*good, burst["later"]]}
        assert names <= ours, names


def test_a_bad_request_fails_alone_with_one_line(burst):
    home = burst["home"]
    assert all(outcome["state"] == "COMPLETED" for outcome in burst["good"])
    for outcome, says in ((burst["bad structure"], "clash"), (burst["bad parameters"], "kind")):
        assert outcome["state"] == "FAILED", outcome
        assert says in outcome["message"] and "\n" not in outcome["message"], outcome
        run = json.loads((home / "results" / outcome["id"] / "run.json").read_text())
        assert run["state"] == "Failed" and run["message"] == outcome["message"]
        assert run["result_ids"] == []


def test_a_request_cancelled_before_it_runs_is_not_computed(burst):
    home, cancelled, later = burst["home"], burst["cancelled"], burst["later"]
    assert cancelled["state"] == "CANCELLED", cancelled
    assert later["state"] == "COMPLETED", later
    assert not (home / "results" / cancelled["id"]).exists()
    assert not list((home / "results").glob(f"*/*{_prefix(cancelled)}-water.json"))


RESTART_BATCHER = textwrap.dedent(
    """
    import os, signal, time
    from atomforge.deployments.service import ServiceSettings, _pid, start_batcher

    settings = ServiceSettings()
    os.kill(_pid(settings, "batcher"), signal.SIGTERM)
    while _pid(settings, "batcher"):
        time.sleep(0.1)
    start_batcher(settings)
    """
)


def test_a_restarted_batcher_runs_again_what_a_dead_one_left(batch_service, tmp_path):
    env, home = batch_service
    water = tmp_path / "water.xyz"
    water.write_text(WATER_XYZ)
    owner = f"batcher {socket.gethostname()} pid {_dead_pid()}"
    parameters = _request(water)["parameters"]
    claimed = create_deployment_run(
        env,
        BATCHED,
        parameters=parameters,
        state={"type": "PENDING", "message": f"claimed by {owner}"},
    )
    running = create_deployment_run(
        env,
        BATCHED,
        parameters=parameters,
        state={"type": "RUNNING", "message": f"in batch {uuid.uuid4()} ({owner})"},
    )
    restarted = subprocess.run(
        [sys.executable, "-c", RESTART_BATCHER], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    for flow_run_id in (claimed, running):
        assert wait_final(env, flow_run_id, timeout=120)["type"] == "COMPLETED"
        assert _document(home, flow_run_id)["status"] == "completed"
    log = (Path(env["ATOMFORGE_SERVICE_DIR"]) / "batcher.log").read_text()
    assert "'scheduled again': 2" in log, log[-2000:]


def _dead_pid() -> int:
    """Return the pid of a process that ended (a batcher that died)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_status_names_the_batcher(batch_service):
    env, _ = batch_service
    status = service(env, "status")
    assert status.returncode == 0, status.stdout
    worker = status.stdout.splitlines()[-1]
    assert "batcher pid" in worker and "atomforge-batch" in worker, worker
    pool = api_get(env, "/work_pools/atomforge-batch")
    assert pool["status"] == "READY", pool
