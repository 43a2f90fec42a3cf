"""Run logs that read well: atomforge's own errors as one line, without a traceback."""

from __future__ import annotations

import logging

from atomforge.engines.errors import AtomforgeError

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class OwnErrorsInOneLine(logging.Filter):
    """Drops the traceback from log records of atomforge's own errors (bad input, a
    failed engine, a workflow with nothing left): their message already says what
    happened, and a traceback of atomforge's internals only hides it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Return True (keep the record), without its traceback if the error is ours."""
        if record.exc_info and isinstance(record.exc_info[1], AtomforgeError):
            record.exc_info = None
            record.exc_text = None
        return True


def own_errors_in_one_line() -> None:
    """Install :class:`OwnErrorsInOneLine` on Prefect's flow and task run loggers (once)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OwnErrorsInOneLine) for f in logger.filters):
            logger.addFilter(OwnErrorsInOneLine())
