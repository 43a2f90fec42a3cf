"""While a screen runs, the UI shows its counts (done, failed, running, left) and, once it
has run a while, a table of the results so far, read back from the embedded Prefect API."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timezone

from ase.build import molecule
from ase.io import write
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from atomforge.engines.status import JobStatus, Status
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.scheduling.claims import claim
from atomforge.flows.screen import screen
from atomforge.flows.ui.counts import Counts, count
from tests.conftest import use_xtb_wrapper

SLOW_OR_BAD = """#!/bin/sh
# Real xtb, 6 s late in a folder named *-slow; in one named *-bad it fails.
case "$(basename "$PWD")" in
  *-slow) sleep 6 ;;
  *-bad) echo "broken on purpose" >&2; exit 1 ;;
esac
exec xtb "$@"
"""
KEYS = ["screen-counts", "screen-partial"]


def _counts(markdown: str) -> dict[str, int]:
    """Return the numbers of the counts artifact's table row."""
    row = re.search(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", markdown, re.MULTILINE)
    return dict(zip(("done", "failed", "running", "left"), map(int, row.groups())))


async def _watch(since: datetime, seen: list[dict], finished: asyncio.Event) -> None:
    """Read the counts and the partial table back from the API until ``finished``."""
    async with get_client() as client:
        while not finished.is_set():
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=KEYS))
            )
            now = {a.key: a.data for a in found if a.created >= since}
            if now and (not seen or seen[-1] != now):
                seen.append(now)
            await asyncio.sleep(0.2)


async def _screen_while_watching(folder) -> tuple[object, list[dict], dict]:
    since = datetime.now(timezone.utc)
    seen: list[dict] = []
    finished = asyncio.Event()
    watcher = asyncio.ensure_future(_watch(since, seen, finished))
    state = await screen(
        StructureSource(path=str(folder)), make_parameters(kind="singlepoint"), return_state=True
    )
    finished.set()
    await watcher
    async with get_client() as client:
        report = await state.aresult(raise_on_failure=False)
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=KEYS))
        )
    final = {a.key: a for a in found if str(a.flow_run_id) == report.flow_run_id}
    return report, seen, final


def test_screen_shows_counts_and_a_growing_table_while_it_runs(tmp_path, monkeypatch):
    use_xtb_wrapper(tmp_path / "xtb-slow-or-bad", SLOW_OR_BAD, monkeypatch)
    monkeypatch.setenv("ATOMFORGE_PARTIAL_TABLE_SECONDS", "0.5")
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("a-slow", "b", "c", "d", "e-bad"):
        write(folder / f"{name}.xyz", molecule("H2O"), format="xyz")

    report, seen, final = asyncio.run(_screen_while_watching(folder))

    assert report.n_completed == 4
    assert _counts(final["screen-counts"].data) == {"done": 4, "failed": 1, "running": 0, "left": 0}
    during = [_counts(s["screen-counts"]) for s in seen if "screen-counts" in s]
    assert any(c["running"] >= 1 for c in during), during
    assert all(sum(c.values()) == 5 for c in during), during
    tables = [json.loads(s["screen-partial"]) for s in seen if "screen-partial" in s]
    sizes = [len(rows) for rows in tables]
    assert sizes and sizes == sorted(sizes) and sizes[0] < 5, sizes
    assert {row["name"] for row in tables[-1]} <= {"a-slow", "b", "c", "d", "e-bad"}
    assert "has them all" in final["screen-partial"].description


def test_counts_read_claims_and_statuses_from_the_job_folders(tmp_path):
    folders = [tmp_path / name for name in ("left", "running", "ended", "broke")]
    for folder in folders:
        folder.mkdir()
    for folder in folders[1:]:
        claim(folder, "run-engine-0")
    JobStatus(Status.completed).write(folders[2])
    JobStatus(Status.failed, "broken").write(folders[3])
    assert count(6, 1, 1, folders) == Counts(done=2, failed=2, running=1, left=1)
