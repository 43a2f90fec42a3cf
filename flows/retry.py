"""The retry policy of the steps: exponential backoff with jitter, only for failures worth it.

Read from the settings when a run submits its steps, not when a module is imported.
"""

from __future__ import annotations

from functools import lru_cache

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


def retrying(task: Task, tags: tuple[str, ...] = ()) -> Task:
    """Return ``task`` with the configured retries, backoff and jitter (settings read now)
    and ``tags`` added."""
    settings = get_settings()
    return _with_retries(
        task, settings.retries, settings.retry_backoff_seconds, settings.retry_jitter, tags
    )


@lru_cache(maxsize=64)
def _with_retries(
    task: Task, retries: int, backoff: float, jitter: float, tags: tuple[str, ...]
) -> Task:
    """Return ``task`` with this retry policy and ``tags``: the same task for the same
    policy, since building one reads the function's source (about 3 ms)."""
    return task.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff),
        retry_jitter_factor=jitter,
        retry_condition_fn=is_worth_retrying,
        tags=set(tags) | task.tags,
    )
