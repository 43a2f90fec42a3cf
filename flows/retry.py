"""The retry policy of the steps: exponential backoff with jitter, only for failures worth it.

Read from the settings when a run submits its steps, not when a module is imported.
"""

from __future__ import annotations

from prefect import Task
from prefect.tasks import exponential_backoff

from atomforge.engines.errors import EngineError, InputError, RunStopped
from atomforge.flows.settings import get_settings


def is_worth_retrying(task, task_run, state) -> bool:
    """Return True only for failures another attempt can fix (never for bad input or stops)."""
    try:
        state.result()
    except EngineError as exc:
        return exc.retryable
    except (InputError, RunStopped):
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


def retrying(task: Task) -> Task:
    """Return ``task`` with the configured retries, backoff and jitter (settings read now)."""
    settings = get_settings()
    return task.with_options(
        retries=settings.retries,
        retry_delay_seconds=exponential_backoff(settings.retry_backoff_seconds),
        retry_jitter_factor=settings.retry_jitter,
        retry_condition_fn=is_worth_retrying,
    )
