"""The inbox as a job queue: claimed once, computed once, never lost, given back when its
run dies; and the screen-inbox flow on it, with real xtb."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ase.build import molecule
from ase.io import write

from atomforge.engines import make_parameters
from atomforge.flows.inbox import InboxReport, inbox_screen
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import load_result, query_results
from atomforge.flows.store.inbox import (
    FileOutcome,
    Inbox,
    claim,
    finish,
    recover,
    release,
)
from tests.conftest import REPO, WATER_XYZ, use_xtb_wrapper

SINGLEPOINT = make_parameters("xtb", kind="singlepoint")


@pytest.fixture(autouse=True)
def _store_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOMFORGE_HOME", str(tmp_path / "home"))


def _drop(inbox: Path, *names: str) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    for name in names:
        write(inbox / f"{name}.xyz", molecule(name), format="xyz")


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".result.json").read_text())


def _claims(inbox: Path) -> list[Path]:
    """Return the claim folders in processing/ (not the lock or a claim being set up)."""
    processing = inbox / "processing"
    return [p for p in processing.glob("*") if not p.name.startswith(".")]


def _screen(inbox: Path, parameters=SINGLEPOINT):
    return asyncio.run(inbox_screen(str(inbox), parameters, return_state=True))


# The queue alone


def _claim_in_process(root: str, claim_id: str, start: float, found) -> None:
    while time.time() < start:
        pass
    found.put((claim_id, [p.name for p in claim(Inbox(Path(root)), claim_id).files]))


def test_claims_racing_in_processes_take_each_file_exactly_once(tmp_path):
    inbox = Inbox(tmp_path / "inbox").create()
    names = [f"s{i:04d}.xyz" for i in range(2000)]  # about 0.15 s of renames: racers overlap
    for name in names:
        (inbox.root / name).write_text(WATER_XYZ)
    context = multiprocessing.get_context("fork")
    found = context.Queue()
    start = time.time() + 0.5
    racers = [
        context.Process(target=_claim_in_process, args=(str(inbox.root), f"run-{i}", start, found))
        for i in range(4)
    ]
    for racer in racers:
        racer.start()
    taken = dict(found.get(timeout=60) for _ in racers)
    for racer in racers:
        racer.join()
    claimed = [name for files in taken.values() for name in files]
    assert sorted(claimed) == names
    assert sum(bool(files) for files in taken.values()) >= 2, "no race happened"
    assert inbox.waiting() == []


def test_a_finished_name_that_comes_again_gets_a_name_of_its_own(tmp_path):
    inbox = Inbox(tmp_path / "inbox").create()
    paths = []
    for run in ("a", "b"):
        (inbox.root / "water.xyz").write_text(WATER_XYZ)
        held = claim(inbox, run)
        outcome = FileOutcome(file="water.xyz", path="", status="done", flow_run_id=run)
        paths.append(finish(held, held.files[0], outcome))
        release(held)
    assert [p.name for p in paths] == ["water.xyz", "water~1.xyz"]
    assert [_sidecar(p)["flow_run_id"] for p in paths] == ["a", "b"]
    assert _claims(inbox.root) == []


CLAIM_AND_WAIT = """
import sys, time
from pathlib import Path
from atomforge.flows.store.inbox import Inbox, claim
held = claim(Inbox(Path(sys.argv[1])), "crashed-run")
print(len(held.files), flush=True)
time.sleep(120)
"""


def test_a_dead_runs_claim_goes_back_and_is_screened_by_the_next_run(tmp_path):
    root = tmp_path / "inbox"
    _drop(root, "H2O", "CH4")
    owner = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_WAIT, str(root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout.readline().strip() == "2"
    claimed = root / "processing" / "crashed-run"
    assert sorted(p.name for p in claimed.iterdir()) == [".owner", "CH4.xyz", "H2O.xyz"]
    assert recover(Inbox(root)) == [], "the claim of a live process was taken"

    owner.kill()
    owner.wait()
    state = _screen(root)
    assert state.is_completed(), state
    report: InboxReport = state.result()
    assert sorted(report.recovered) == ["CH4.xyz", "H2O.xyz"]
    assert sorted(f.file for f in report.files if f.status == "done") == ["CH4.xyz", "H2O.xyz"]
    assert not claimed.exists() and _claims(root) == []


# The flow


def test_an_empty_inbox_is_a_quick_success_in_the_configured_folder(tmp_path, monkeypatch):
    root = tmp_path / "not-yet" / "inbox"
    monkeypatch.setenv("ATOMFORGE_INBOX_DIR", str(root))
    asyncio.run(inbox_screen(str(tmp_path / "warm-up")))  # the embedded API starts once
    started = time.perf_counter()
    state = asyncio.run(inbox_screen(return_state=True))
    seconds = time.perf_counter() - started
    assert state.is_completed()
    assert state.message == f"no files waiting in {root.resolve()}"
    assert seconds < 5, seconds
    assert sorted(p.name for p in root.iterdir()) == ["done", "failed", "processing"]
    assert not (
        get_settings().resolved_results_root() / str(state.state_details.flow_run_id)
    ).exists()


def test_files_end_in_done_or_failed_with_their_results_and_reasons(tmp_path):
    root = tmp_path / "inbox"
    _drop(root, "H2O", "NH3")
    (root / "overlap.xyz").write_text("2\n\nH 0 0 0\nH 0 0 0.1\n")
    (root / "garbage.xyz").write_text("this is no structure\n")
    (root / "notes.txt").write_text("not for the screen\n")
    squashed = molecule("H2")
    squashed.positions[1] = squashed.positions[0] + (0, 0, 0.1)
    write(root / "pair.xyz", [molecule("CH4"), squashed], format="extxyz")

    state = _screen(root)
    assert state.is_completed(), state
    assert state.message == f"6 file(s) from {root.resolve()}: 2 done, 4 failed"
    assert sorted(p.name for p in (root / "done").glob("*.xyz")) == ["H2O.xyz", "NH3.xyz"]
    results_root = get_settings().resolved_results_root()
    for name in ("H2O", "NH3"):
        sidecar = _sidecar(root / "done" / f"{name}.xyz")
        assert sidecar["status"] == "done"
        [result] = sidecar["results"]
        document = load_result(results_root, *result["id"].split("/"))
        assert (document.name, document.status.value) == (name, "completed")

    overlap = _sidecar(root / "failed" / "overlap.xyz")
    assert "overlap" in overlap["message"] and overlap["results"] == []
    assert "cannot read structure" in _sidecar(root / "failed" / "garbage.xyz")["message"]
    assert "not a structure file" in _sidecar(root / "failed" / "notes.txt")["message"]
    pair = _sidecar(root / "failed" / "pair.xyz")
    assert [(r["name"], r["status"]) for r in pair["results"]] == [
        ("pair-0", "completed"),
        ("pair-1", "invalid"),
    ]
    assert pair["message"].startswith("pair-1: invalid: atoms 0 (H) and 1 (H) overlap")
    assert [p for p in root.iterdir() if p.is_file()] == [] and _claims(root) == []


def test_an_inbox_screen_whose_structures_fail_ends_failed_and_files_its_files(tmp_path):
    root = tmp_path / "inbox"
    _drop(root, "H2O", "NH3")
    state = _screen(root, make_parameters("xtb", kind="singlepoint", timeout_seconds=0.001))
    assert state.is_failed(), state
    assert "2 done" not in state.message and "2 of 2 failed" in state.message
    assert sorted(p.name for p in (root / "failed").glob("*.xyz")) == ["H2O.xyz", "NH3.xyz"]


SLOW_XTB = """#!/bin/sh
sleep 3
exec xtb "$@"
"""


def test_a_file_dropped_during_a_run_waits_for_the_next(tmp_path, monkeypatch):
    root = tmp_path / "inbox"
    _drop(root, "H2O")
    wrapper = use_xtb_wrapper(tmp_path / "xtb-slow", SLOW_XTB, monkeypatch)

    async def drop_while_running():
        run = asyncio.ensure_future(inbox_screen(str(root), SINGLEPOINT, return_state=True))
        deadline = time.monotonic() + 120
        while not list((root / "processing").glob("*/H2O.xyz")):
            assert time.monotonic() < deadline and not run.done()
            await asyncio.sleep(0.05)
        _drop(root, "CH4")
        return await run

    first = asyncio.run(drop_while_running())
    assert first.is_completed(), first
    assert [f.file for f in first.result().files] == ["H2O.xyz"]
    assert (root / "CH4.xyz").exists()

    monkeypatch.setenv("ATOMFORGE_XTB_COMMAND", "xtb")
    wrapper.unlink()
    second = _screen(root)
    assert [(f.file, f.status) for f in second.result().files] == [("CH4.xyz", "done")]


def test_a_run_that_fails_gives_its_files_back(tmp_path, monkeypatch):
    root = tmp_path / "inbox"
    _drop(root, "H2O")
    monkeypatch.setenv("ATOMFORGE_XTB_COMMAND", str(tmp_path / "no-such-xtb"))
    state = _screen(root)
    assert state.is_failed(), state
    assert (root / "H2O.xyz").exists() and _claims(root) == []


INBOX_SCRIPT = """
import asyncio
import sys
from atomforge.engines import make_parameters
from atomforge.flows.inbox import inbox_screen

if __name__ == "__main__":
    params = make_parameters("xtb", kind="singlepoint")
    state = asyncio.run(inbox_screen(sys.argv[1], params, return_state=True))
    print("STATE", state.type.value, state.message)
    sys.exit(0 if state.is_completed() else 1)
"""
WAVES = (("H2O", "CH4", "NH3", "CO2", "H2", "N2"), ("CO", "HF", "HCN", "C2H2", "C2H4", "CH3OH"))
HELD_XTB = """#!/bin/sh
# Real xtb, computing once the test says go: both screens hold their claims meanwhile.
[ "$1" = --version ] && exec xtb "$@"
for i in $(seq 1200); do [ -e "{go}" ] && break; sleep 0.1; done
exec xtb "$@"
"""


def _start_inbox_screen(tmp_path: Path, root: Path, name: str) -> subprocess.Popen:
    script = tmp_path / "inbox_process.py"
    script.write_text(INBOX_SCRIPT)
    with (tmp_path / f"{name}.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, str(script), str(root)],
            cwd=REPO,
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_for_claim(root: Path, names: tuple[str, ...], run: subprocess.Popen) -> Path:
    """Return the claim folder that holds the files ``names``, once one does."""
    wanted = sorted(f"{name}.xyz" for name in names)
    deadline = time.monotonic() + 180
    while True:
        for folder in _claims(root):
            if sorted(p.name for p in folder.glob("*.xyz")) == wanted:
                return folder
        assert time.monotonic() < deadline and run.poll() is None, "no claim of " + str(names)
        time.sleep(0.1)


def test_two_inbox_screens_of_one_folder_compute_every_file_once(tmp_path, monkeypatch):
    root = tmp_path / "inbox"
    go = tmp_path / "go"
    use_xtb_wrapper(tmp_path / "xtb-held", HELD_XTB.replace("{go}", str(go)), monkeypatch)
    _drop(root, *WAVES[0])
    first = _start_inbox_screen(tmp_path, root, "first")
    first_claim = _wait_for_claim(root, WAVES[0], first)
    _drop(root, *WAVES[1])
    second = _start_inbox_screen(tmp_path, root, "second")
    second_claim = _wait_for_claim(root, WAVES[1], second)
    assert sorted(p.name for p in first_claim.glob("*.xyz")) == sorted(
        f"{name}.xyz" for name in WAVES[0]
    ), "the second run took files of the first"
    go.touch()
    for run in (first, second):
        run.wait(timeout=300)
    logs = [(tmp_path / f"{name}.log").read_text()[-3000:] for name in ("first", "second")]
    assert [first.returncode, second.returncode] == [0, 0], logs

    molecules = WAVES[0] + WAVES[1]
    done = sorted(p.name for p in (root / "done").iterdir() if p.suffix == ".xyz")
    assert done == sorted(f"{name}.xyz" for name in molecules)
    assert list((root / "failed").iterdir()) == [] and _claims(root) == []
    computed = query_results(get_settings().resolved_results_root(), status="completed")
    assert sorted(r.name for r in computed) == sorted(molecules)
    by_run = {name: _sidecar(root / "done" / f"{name}.xyz")["flow_run_id"] for name in molecules}
    assert {by_run[name] for name in WAVES[0]} == {first_claim.name}
    assert {by_run[name] for name in WAVES[1]} == {second_claim.name}
    ids = [_sidecar(root / "done" / name)["results"][0]["id"] for name in done]
    assert sorted(ids) == sorted(f"{r.flow_run_id}/{r.id}" for r in computed)
