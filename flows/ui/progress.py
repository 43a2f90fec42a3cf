"""A run's progress bar: a Prefect progress artifact moved forward as results are stored."""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import UUID

from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

from atomforge.flows.models import StructureResult
from atomforge.flows.settings import get_settings
from atomforge.flows.ui.terminal import TerminalBar


class RunProgress:
    """The progress artifact of one run, driven from the flow's process.

    Must be created inside a running event loop. The artifact is created in the
    background, so nothing waits for the API; :meth:`advance` updates it at most once
    per ``interval`` seconds, skipping an update while the artifact is still being created
    or the previous update is on its way, and logs how far the run is. With
    ``ATOMFORGE_TERMINAL_PROGRESS`` it also draws a bar on the terminal, moved by every
    structure.
    """

    def __init__(
        self, key: str, title: str, logger: logging.LoggerAdapter, interval: float = 1.0
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.total = 0
        self.done = 0
        self.last_update = time.monotonic()
        self.creating: asyncio.Future[UUID] = asyncio.ensure_future(
            acreate_progress_artifact(0.0, key=f"{key}-progress", description=title)
        )
        self.updating: asyncio.Future[None] | None = None
        self.terminal = TerminalBar(title) if get_settings().terminal_progress else None

    def percent(self) -> float:
        """Return how much of the run is done, in percent."""
        return min(100.0, 100.0 * self.done / max(self.total, 1))

    def advance(self, result: StructureResult) -> None:
        """Count ``result``'s structure as done."""
        self.done += 1
        if self.terminal is not None:
            self.terminal.update(self.done, self.total, f"{result.name}: {result.status}")
        now = time.monotonic()
        busy = self.updating is not None and not self.updating.done()
        if now - self.last_update < self.interval or not self.creating.done() or busy:
            return
        if self.creating.cancelled() or self.creating.exception() is not None:
            return
        if self.updating is not None:
            self._warn_if_failed(self.updating.exception())
        self.last_update = now
        self.logger.info(
            "%d of %d structure(s) done; last %s: %s",
            self.done,
            self.total,
            result.name,
            result.status,
            extra={"structure": result.name},
        )
        self.updating = asyncio.ensure_future(
            aupdate_progress_artifact(self.creating.result(), self.percent())
        )

    async def finish(self) -> None:
        """Wait for the updates on their way, then set the bar to 100 %."""
        self.close_terminal()
        artifact_id = await self.creating
        if self.updating is not None:
            (outcome,) = await asyncio.gather(self.updating, return_exceptions=True)
            self._warn_if_failed(outcome)
        await aupdate_progress_artifact(artifact_id, 100.0)

    def _warn_if_failed(self, outcome: object) -> None:
        """Log a warning if ``outcome`` (of an update) is an exception: updates may fail."""
        if isinstance(outcome, Exception):
            self.logger.warning("progress update failed: %s", outcome)

    def cancel(self) -> None:
        """Drop the creation or update still on its way (the run is being stopped)."""
        self.close_terminal()
        self.creating.cancel()
        if self.updating is not None:
            self.updating.cancel()

    def close_terminal(self) -> None:
        """Leave the terminal bar as it is now, if there is one."""
        if self.terminal is not None:
            self.terminal.close()
            self.terminal = None
