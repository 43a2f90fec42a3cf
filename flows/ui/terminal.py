"""A progress bar on the terminal for runs started from the ``atomforge`` command."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class TerminalBar:
    """A bar on standard error: structures done of all, time, and the last one's outcome."""

    def __init__(self, title: str) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task(title, total=None, last="")
        self.progress.start()

    def update(self, done: int, total: int, last: str) -> None:
        """Show ``done`` of ``total`` structures, the last of them ``last``."""
        self.progress.update(self.task, completed=done, total=total or None, last=last)

    def close(self) -> None:
        """Draw the bar a last time and leave it on the terminal."""
        self.progress.stop()
