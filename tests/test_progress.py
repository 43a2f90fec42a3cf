"""The run's progress bar moves as results are stored, on the real embedded Prefect API."""

from __future__ import annotations

import asyncio

from prefect import flow, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId
from prefect.logging import get_run_logger

from atomforge.flows.models import StructureResult
from atomforge.flows.ui.progress import RunProgress


def _result(name: str) -> StructureResult:
    return StructureResult(
        id=f"00000-{name}",
        flow_run_id="progress",
        flow_name="progress",
        index=0,
        name=name,
        status="completed",
        engine="xtb",
        parameters={},
        formula="H2O",
        n_atoms=3,
        input_structure="",
    )


async def _bar(progress: RunProgress) -> float:
    artifact_id = await progress.creating
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id]))
        )
    return found[0].data


@flow
async def _two_of_four_then_finish() -> list[float]:
    progress = RunProgress("progress", "test run", get_run_logger(), interval=0.0)
    progress.total = 4
    await progress.creating
    seen = []
    for name in ("a", "b"):
        progress.advance(_result(name))
        await progress.updating
        seen.append(await _bar(progress))
    await progress.finish()
    return [*seen, await _bar(progress)]


def test_progress_bar_follows_stored_results_then_ends_at_100():
    assert asyncio.run(_two_of_four_then_finish()) == [25.0, 50.0, 100.0]


@flow
async def _updates_at_most_once_an_interval() -> tuple[bool, int]:
    progress = RunProgress("progress", "test run", get_run_logger(), interval=3600.0)
    progress.total = 10
    await progress.creating
    for name in "abcdefghij":
        progress.advance(_result(name))
    sent = progress.updating is not None
    await progress.finish()
    return sent, progress.done


def test_progress_updates_are_rate_limited():
    assert asyncio.run(_updates_at_most_once_an_interval()) == (False, 10)
