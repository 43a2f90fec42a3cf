"""A run-engine task that finishes early takes over the structures a slow one has not started."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ase.build import molecule
from ase.io import write

from atomforge.flows.jobs import engine_owner
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.scheduling.claims import claim, claim_owner, claimed_directories
from atomforge.flows.screen import screen
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import iter_results
from tests.conftest import use_xtb_wrapper

LATE_FOR_SOME = """#!/bin/sh
# Real xtb, 3 s late for a folder named *-slow and 1 s late for one named *-wait.
case "$(basename "$PWD")" in
  *-slow) sleep 3 ;;
  *-wait) sleep 1 ;;
esac
exec xtb "$@"
"""


def test_a_free_task_takes_over_the_tail_of_a_slow_chunk(tmp_path, monkeypatch):
    use_xtb_wrapper(tmp_path / "xtb-late-for-some", LATE_FOR_SOME, monkeypatch)
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("a-slow", "b", "c"):
        write(folder / f"{name}.xyz", molecule("H2O"), format="xyz")
    write(folder / "d-wait.xyz", molecule("CH4"), format="xyz")
    # Balanced by atoms squared: methane (25) alone in chunk 0, the waters (3 x 9) in chunk 1.
    # Chunk 1's task starts on a-slow while chunk 0's waits a second on methane; then the
    # latter takes over c and b, which chunk 1's task has not started.
    report = asyncio.run(
        screen(StructureSource(path=str(folder)), make_parameters(kind="singlepoint"))
    )
    assert report.n_completed == 4
    root = get_settings().resolved_results_root()
    owners = {r.name: claim_owner(Path(r.workdir)) for r in iter_results(root, report.flow_run_id)}
    assert owners["d-wait"] == owners["b"] == owners["c"] == engine_owner(0)
    assert owners["a-slow"] == engine_owner(1)


def test_claims_are_exclusive_and_a_task_keeps_its_own(tmp_path):
    chunks = [[tmp_path / f"a{i}" for i in range(3)], [tmp_path / "b0"]]
    for directory in chunks[0] + chunks[1]:
        directory.mkdir()
    assert claim(chunks[0][0], "first")
    assert not claim(chunks[0][0], "second")
    assert claim(chunks[0][0], "first")
    taken = list(claimed_directories(chunks, 1, "second", take_over=True))
    assert taken == [chunks[1][0], chunks[0][2], chunks[0][1]]
    assert list(claimed_directories(chunks, 0, "first", take_over=True)) == [chunks[0][0]]
    assert list(claimed_directories(chunks, 1, "third", take_over=False)) == []
