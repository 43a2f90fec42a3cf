"""Ctrl-C while a flow runs in this process: cancel the run, and say so in one line.

:func:`run` runs a flow coroutine; the first SIGINT (Ctrl-C, relayed by the local server's
caller, or sent by :func:`interrupt`) cancels it. The pipeline then stops the run's
engines, Prefect marks the run Crashed and calls its on_crashed hooks, and
:func:`atomforge.flows.hooks.stop_engines`, seeing :func:`reason`, records the run Cancelled
in ``run.json`` and settles its documents as for a cancel, and marks it Cancelled in Prefect
(:func:`mark_cancelled`). Console logging stops at the interrupt, so that the command ends
with the one line :func:`Interrupted.line` says.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import warnings
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_reason: str | None = None
_cancelling: list[asyncio.Task] = []
_cancelled: list[str] = []


class Interrupted(Exception):
    """A flow run of this process was interrupted; the runs it names were cancelled."""

    def __init__(self, why: str, runs: list[str]) -> None:
        super().__init__(why)
        self.why = why
        self.runs = runs

    def line(self) -> str:
        """Return the one line the command prints: why, and which runs were cancelled."""
        if not self.runs:
            return f"atomforge: {self.why}"
        return f"atomforge: {self.why}; run {', '.join(self.runs)} cancelled"


def reason() -> str | None:
    """Return why this process was interrupted, or None if it was not."""
    return _reason


def interrupt(why: str) -> None:
    """Interrupt this process as Ctrl-C does, because of ``why`` (from any thread)."""
    global _reason
    _reason = _reason or why
    os.kill(os.getpid(), signal.SIGINT)


def mark_cancelled(flow_run: Any) -> None:
    """Set ``flow_run``'s state in Prefect to Cancelled and remember it for the last line."""
    from prefect import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Cancelled(message=_reason), force=True)
    _cancelled.append(f"{flow_run.name!r} ({flow_run.id})")


def silence_console() -> None:
    """Stop this process's log records and warnings from reaching the terminal (the run
    logs still get them): the command's last word is one line."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is not logging.FileHandler and isinstance(
                handler, logging.StreamHandler
            ):
                handler.setLevel(logging.CRITICAL + 1)
    warnings.simplefilter("ignore")


def _on_sigint(task: asyncio.Task) -> None:
    """Cancel ``task`` on the first SIGINT; a later one changes nothing."""
    global _reason
    if task in _cancelling:
        return
    _cancelling.append(task)
    _reason = _reason or "interrupted"
    silence_console()
    task.cancel()


async def _cancel_on_sigint(coroutine: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, _on_sigint, asyncio.current_task())
    try:
        return await coroutine
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Return what ``coroutine`` returns, run as ``asyncio.run`` does; the first SIGINT
    cancels it. Raises :class:`Interrupted` when it was interrupted."""
    try:
        outcome = asyncio.run(_cancel_on_sigint(coroutine))
    except BaseException:
        if _reason is None:
            raise
        outcome = None
    if _reason is not None:
        raise Interrupted(_reason, list(_cancelled))
    return outcome
