"""Each run-engine task carries its engine's name as a tag, so a Prefect tag concurrency
limit (e.g. `prefect concurrency-limit create vasp 4`) bounds that engine's tasks."""

from __future__ import annotations

import asyncio

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.screen import screen
from tests.conftest import WATER_XYZ


async def _task_tags(flow_run_id: str) -> dict[str, set[str]]:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name.rsplit("-", 1)[0]: set(run.tags) for run in runs}


def test_run_engine_tasks_carry_their_engine_as_a_tag():
    report = asyncio.run(
        screen(StructureSource(text=WATER_XYZ), make_parameters(engine="emt", kind="singlepoint"))
    )
    tags = asyncio.run(_task_tags(report.flow_run_id))
    assert "emt" in tags["run-engine"], tags
    assert "emt" not in tags["validate"]
