"""Engine output and per-structure progress of a run-engine task, sent to the run's logs."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from prefect.logging import get_run_logger
from prefect.logging.handlers import APILogHandler
from prefect.logging.loggers import PrefectLogAdapter

from atomforge.engines.status import JobStatus

ENGINE_LOGGER = "prefect.atomforge.engine"


def engine_output_to_api_only() -> None:
    """Send engine output to the Prefect API (the UI's run logs) but not to the console."""
    logger = logging.getLogger(ENGINE_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


class OutputStreamer:
    """Streams engine output to the run's logs in blocks: at most one record a second.

    One record per output line would cost more than the engines themselves on fast
    structures, so output goes out in blocks, each at most ``max_chars`` long. When an
    engine writes faster than that (xtb prints about 40 kB per small molecule), a block
    keeps its latest lines and says how many earlier ones were left out: the run logs
    stay live without turning Prefect's database into an output archive. The complete
    output is always in each working directory's log file.
    """

    def __init__(self, max_chars: int, interval: float = 1.0) -> None:
        run_logger = get_run_logger()
        self.logger = PrefectLogAdapter(logging.getLogger(ENGINE_LOGGER), run_logger.extra)
        self.max_chars = max_chars
        self.interval = interval
        self.parts: list[str] = []
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        """Take a block of output; send what has gathered if the interval has passed."""
        with self.lock:
            self.parts.append(text)
        if time.monotonic() - self.last_flush >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Send the output gathered so far (its latest ``max_chars`` characters)."""
        with self.lock:
            text, self.parts = "".join(self.parts), []
            self.last_flush = time.monotonic()
        text = text.rstrip("\n")
        if not text or self.max_chars <= 0:
            return
        if len(text) > self.max_chars:
            cut = len(text) - self.max_chars
            newline = text.find("\n", cut)
            start = newline + 1 if newline >= 0 else cut
            skipped = text.count("\n", 0, start)
            text = (
                f"[{skipped} earlier line(s) not sent; the working directories' logs have "
                f"them all]\n{text[start:]}"
            )
        self.logger.info("engine output:\n%s", text)


def last_lines(path: Path, count: int, max_bytes: int = 16384) -> list[str]:
    """Return the last ``count`` lines of the text file ``path`` (none if it is missing),
    reading at most its last ``max_bytes``."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-count:] if count else []


class ProgressReporter:
    """Reports the structures a run-engine task finishes, at a fixed cost.

    Each finished structure gets a marker line in the engine output stream; a failure is
    also logged at once as a warning, with the last ``tail`` lines of the engine's log
    file in its directory (``log_name``); once a second at most, a progress line goes to
    the task's log. The run's progress bar is moved by the flow, as it stores results.
    """

    def __init__(
        self,
        own: int,
        logger: logging.LoggerAdapter,
        output: OutputStreamer,
        log_name: str,
        tail: int,
    ) -> None:
        self.own = own
        self.logger = logger
        self.output = output
        self.log_name = log_name
        self.tail = tail
        self.finished = 0
        self.last_update = 0.0

    def __call__(self, directory: Path, status: JobStatus) -> None:
        """Record how ``directory`` ended; log progress if a second has passed."""
        self.finished += 1
        line = f"{directory.name}: {status.status} {status.message}".rstrip()
        self.output(f"== {line}\n")
        if not status.completed:
            log = directory / self.log_name
            output = last_lines(log, self.tail)
            if output:
                line += f"\nlast {len(output)} line(s) of {log}:\n" + "\n".join(output)
            self.logger.warning(line, extra={"structure": directory.name})
        now = time.monotonic()
        if now - self.last_update < 1.0:
            return
        self.last_update = now
        self.logger.info(
            "%d finished (own chunk: %d); last %s",
            self.finished,
            self.own,
            line,
            extra={"structure": directory.name},
        )
