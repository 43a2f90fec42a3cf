"""The context the in-process Dask runner gives a task is Prefect's own, less Prefect's
settings when the run's are the process's (the worker thread has them), and with them when
a run has settings of its own."""

from __future__ import annotations

from uuid import uuid4

from prefect import flow, task
from prefect.context import serialize_context
from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings

from atomforge.flows.scheduling.dask_runner import task_context


@task
def _noop() -> None:
    """A task to build contexts for."""


def _asset() -> dict:
    return {"task": _noop, "task_run_id": uuid4(), "task_inputs": {}, "copy_to_child_ctx": True}


@flow
def _contexts() -> tuple[dict, dict]:
    asset = _asset()
    return task_context(asset), serialize_context(asset_ctx_kwargs=asset)


@flow
def _contexts_with_settings_of_its_own() -> dict:
    return task_context(_asset())


def test_a_task_context_is_prefects_less_the_settings_the_process_has():
    ours, prefects = _contexts()
    assert ours.keys() == prefects.keys()
    assert ours["settings_context"] == {} and prefects["settings_context"]
    for key in ("flow_run_context", "tags_context", "deployment_id", "deployment_parameters"):
        assert ours[key] == prefects[key], key
    assert ours["asset_context"].keys() == prefects["asset_context"].keys()


def test_a_run_with_settings_of_its_own_sends_them():
    with temporary_settings({PREFECT_LOGGING_LEVEL: "ERROR"}):
        ours = _contexts_with_settings_of_its_own()
    assert ours["settings_context"]["settings"]["logging"]["level"] == "ERROR"
