"""A run's progress in the Prefect UI: a progress bar moved forward as results are stored,
the counts (done, failed, running, left) and, in long runs, a table of the results so far."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from uuid import UUID

from prefect import get_client
from prefect.artifacts import (
    MarkdownArtifact,
    TableArtifact,
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.client.schemas.actions import ArtifactUpdate

from atomforge.flows.jobs import Job
from atomforge.flows.models import StructureResult
from atomforge.flows.settings import get_settings
from atomforge.flows.ui.artifacts import result_rows
from atomforge.flows.ui.counts import Counts, count, counts_markdown
from atomforge.flows.ui.terminal import TerminalBar


class RunProgress:
    """The progress artifacts of one run, driven from the flow's process.

    Must be created inside a running event loop. The bar is created in the background,
    so nothing waits for the API; :meth:`advance` updates it at most once per
    ``interval`` seconds, skipping an update while the artifact is still being created
    or the previous update is on its way, and logs how far the run is. With
    ``ATOMFORGE_TERMINAL_PROGRESS`` it also draws a bar on the terminal, moved by every
    structure.

    Once :meth:`watch` is given the jobs to compute (a screen's; a one-structure run
    has no counts), a background task looks at their folders every ``interval``
    seconds and, when the counts changed, writes them to the ``<key>-counts`` markdown
    artifact; after ``table_interval`` seconds
    (``ATOMFORGE_PARTIAL_TABLE_SECONDS``; 0: never) it also writes the results parsed so
    far to the ``<key>-partial`` table, at most once per ``table_interval``. Both are
    created once and then updated in place. Per structure :meth:`advance` only counts.
    """

    def __init__(
        self,
        key: str,
        title: str,
        logger: logging.LoggerAdapter,
        interval: float = 1.0,
        table_interval: float | None = None,
    ) -> None:
        self.key = key
        self.title = title
        self.logger = logger
        self.interval = interval
        settings = get_settings()
        self.table_interval = (
            settings.partial_table_seconds if table_interval is None else table_interval
        )
        self.total = 0
        self.done = 0
        self.completed = 0
        self.results: list[StructureResult] = []
        self.unparsed: dict[int, Path] = {}
        self.started = time.monotonic()
        self.last_update = self.started
        self.last_table = self.started
        self.creating: asyncio.Future[UUID] = asyncio.ensure_future(
            acreate_progress_artifact(0.0, key=f"{key}-progress", description=title)
        )
        self.updating: asyncio.Future[None] | None = None
        self.watching: asyncio.Future[None] | None = None
        self.stopping = asyncio.Event()
        self.counts_id: UUID | None = None
        self.table_id: UUID | None = None
        self.table_rows = 0
        self.terminal = TerminalBar(title) if settings.terminal_progress else None

    def percent(self) -> float:
        """Return how much of the run is done, in percent."""
        return min(100.0, 100.0 * self.done / max(self.total, 1))

    def counts(self) -> Counts:
        """Return the counts from the results parsed so far and the folders of the others
        (this reads files: call it off the event loop)."""
        return count(
            self.total, self.completed, self.done - self.completed, list(self.unparsed.values())
        )

    def watch(self, jobs: list[Job]) -> None:
        """Start watching the folders of ``jobs`` (those to compute) for the counts."""
        self.unparsed = {job.index: job.directory for job in jobs}
        self.watching = asyncio.ensure_future(self._watch())

    def advance(self, result: StructureResult) -> None:
        """Count ``result``'s structure as done."""
        self.done += 1
        self.completed += result.ok
        self.results.append(result)
        self.unparsed.pop(result.index, None)
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

    async def _watch(self) -> None:
        """Write the counts when they change, and the results so far when they are due,
        every ``interval`` seconds (or, if looking at the folders takes longer than a
        twentieth of that, twenty times as long as it took) until :meth:`stop`."""
        sent = None
        while not self.stopping.is_set():
            pause = max(self.interval, 0.05)
            try:
                start = time.monotonic()
                counts = await asyncio.to_thread(self.counts)
                pause = max(pause, 20 * (time.monotonic() - start))
                if counts != sent:
                    await self._write_counts(counts_markdown(self.title, counts))
                    sent = counts
                if self._table_due():
                    await self._write_table()
            except Exception as exc:  # the UI misses an update; the run goes on
                self._warn_if_failed(exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), pause)

    def _table_due(self) -> bool:
        """Return whether the table of results so far should be written now."""
        if not self.table_interval or len(self.results) == self.table_rows:
            return False
        return time.monotonic() - self.last_table >= self.table_interval

    async def _write_counts(self, text: str) -> None:
        """Create the counts artifact, or update it in place."""
        if self.counts_id is None:
            self.counts_id = await acreate_markdown_artifact(
                text, key=f"{self.key}-counts", description=f"{self.title}: counts"
            )
            return
        data = await MarkdownArtifact(markdown=text).aformat()
        await _update(self.counts_id, ArtifactUpdate(data=data))

    async def _write_table(self) -> None:
        """Create the table of the results parsed so far, or update it in place."""
        results = list(self.results)
        rows = result_rows(results[-get_settings().table_rows :])
        self.last_table = time.monotonic()
        self.table_rows = len(results)
        description = f"{self.title}: results so far, {len(results)} of {self.total}"
        if len(rows) < len(results):
            description += f" (the latest {len(rows)} shown)"
        if self.table_id is None:
            self.table_id = await acreate_table_artifact(
                rows, key=f"{self.key}-partial", description=description
            )
            return
        data = await TableArtifact(table=rows).aformat()
        await _update(self.table_id, ArtifactUpdate(data=data, description=description))

    async def finish(self) -> None:
        """Stop watching, wait for the updates on their way, then set the bar to 100 % and
        the counts to the final ones (every structure has ended)."""
        self.stop()
        artifact_id = await self.creating
        if self.updating is not None:
            (outcome,) = await asyncio.gather(self.updating, return_exceptions=True)
            self._warn_if_failed(outcome)
        final = Counts(self.completed, self.total - self.completed, 0, 0)
        writes = [aupdate_progress_artifact(artifact_id, 100.0)]
        if self.watching is not None:
            (outcome,) = await asyncio.gather(self.watching, return_exceptions=True)
            self._warn_if_failed(outcome)
            writes.append(self._write_counts(counts_markdown(self.title, final, finished=True)))
        if self.table_id is not None:
            update = ArtifactUpdate(
                description=f"{self.title}: results so far, {self.table_rows} of "
                f"{self.total}; the run's {self.key}-table has them all"
            )
            writes.append(_update(self.table_id, update))
        for outcome in await asyncio.gather(*writes, return_exceptions=True):
            self._warn_if_failed(outcome)

    def _warn_if_failed(self, outcome: object) -> None:
        """Log a warning if ``outcome`` (of an update) is an exception: updates may fail."""
        if isinstance(outcome, Exception):
            self.logger.warning("progress update failed: %s", outcome)

    def cancel(self) -> None:
        """Drop the creation or update still on its way (the run is being stopped)."""
        self.stop()
        for future in (self.creating, self.updating, self.watching):
            if future is not None:
                future.cancel()

    def stop(self) -> None:
        """Stop watching the folders (after the look in progress) and leave the terminal
        bar as it is now."""
        self.stopping.set()
        if self.terminal is not None:
            self.terminal.close()
            self.terminal = None


async def _update(artifact_id: UUID, update: ArtifactUpdate) -> None:
    """Update the artifact ``artifact_id`` in place."""
    async with get_client() as client:
        await client.update_artifact(artifact_id=artifact_id, artifact=update)
