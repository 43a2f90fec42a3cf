"""A Prefect tag concurrency limit named after an engine (`prefect concurrency-limit create
vasp 4`) bounds that engine's run-engine tasks; without one they carry no tag, so Prefect
does not ask the server for slots before each of them."""

from __future__ import annotations

import asyncio

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun

from atomforge.flows.models import RunOptions, StructureSource, make_parameters
from atomforge.flows.screen import screen
from tests.conftest import WATER_XYZ

TWO_WATERS = WATER_XYZ + WATER_XYZ.replace("water", "water-2")


async def _task_runs(flow_run_id: str) -> list[TaskRun]:
    async with get_client() as client:
        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


async def _limit_engine(tag: str, limit: int | None) -> None:
    async with get_client() as client:
        if limit is None:
            await client.delete_concurrency_limit_by_tag(tag)
        else:
            await client.create_concurrency_limit(tag=tag, concurrency_limit=limit)


def test_run_engine_tasks_carry_no_tag_without_a_limit():
    report = asyncio.run(
        screen(StructureSource(text=WATER_XYZ), make_parameters(engine="emt", kind="singlepoint"))
    )
    runs = asyncio.run(_task_runs(report.flow_run_id))
    assert [run.tags for run in runs if run.name.startswith("run-engine")] == [[]]


def test_an_engine_tag_limit_tags_run_engine_and_runs_its_tasks_one_at_a_time():
    asyncio.run(_limit_engine("xtb", 1))
    try:
        report = asyncio.run(
            screen(
                StructureSource(text=TWO_WATERS),
                make_parameters(engine="xtb", kind="singlepoint"),
                RunOptions(chunk_size=1),
            )
        )
    finally:
        asyncio.run(_limit_engine("xtb", None))
    runs = asyncio.run(_task_runs(report.flow_run_id))
    engine_runs = sorted(
        (run for run in runs if run.name.startswith("run-engine")), key=lambda r: r.start_time
    )
    assert len(engine_runs) == 2
    assert all(run.tags == ["xtb"] for run in engine_runs)
    assert not any("xtb" in run.tags for run in runs if run.name.startswith("validate"))
    first, second = engine_runs
    assert second.start_time >= first.end_time, "the limit of 1 let both run at once"
    assert report.n_completed == 2
