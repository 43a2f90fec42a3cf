"""Retries: a step killed from outside is retried with backoff; bad input never is."""

from __future__ import annotations

import asyncio

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Failed

from atomforge.engines.errors import EngineError, InputError, RunStopped
from atomforge.flows.models import StructureSource, make_parameters
from atomforge.flows.retry import is_worth_retrying
from atomforge.flows.simulate import simulate
from tests.conftest import use_xtb_wrapper

KILLED_ONCE = """#!/bin/sh
# Real xtb, except that its first calculation is killed with SIGKILL, as the OOM killer would.
if [ "$1" = "input.xyz" ] && [ ! -e "{marker}" ]; then
  touch "{marker}"
  kill -9 $$
fi
exec xtb "$@"
"""


def _task_runs(flow_run_id: str) -> dict[str, int]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name.rsplit("-", 1)[0]: r.run_count for r in runs}


def test_engine_killed_from_outside_is_retried_and_then_succeeds(tmp_path, monkeypatch, water_file):
    use_xtb_wrapper(
        tmp_path / "xtb-killed-once", KILLED_ONCE.format(marker=tmp_path / "killed"), monkeypatch
    )
    result = asyncio.run(
        simulate(StructureSource(path=str(water_file)), make_parameters(kind="singlepoint"))
    )
    assert (tmp_path / "killed").exists()
    assert result.status == "completed"
    assert _task_runs(result.flow_run_id)["run-engine"] == 2


def test_bad_input_is_not_retried(tmp_path):
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    state = asyncio.run(
        simulate(StructureSource(path=str(empty)), make_parameters(), return_state=True)
    )
    assert state.is_failed()
    assert _task_runs(str(state.state_details.flow_run_id)) == {"validate": 1}


def test_only_retryable_failures_are_worth_retrying():
    def worth(exc: Exception) -> bool:
        return is_worth_retrying(None, None, Failed(data=exc))

    assert worth(EngineError("killed by signal 9", retryable=True))
    assert worth(OSError("disk hiccup"))
    assert not worth(EngineError("SCF did not converge"))
    assert not worth(InputError("empty file"))
    assert not worth(RunStopped("cancelled"))
    assert not worth(ValueError("bug"))
