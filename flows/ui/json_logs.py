"""Structured JSON logs for log shippers: the fields each record carries besides Prefect's.

Opt in with ``PREFECT_LOGGING_SETTINGS_PATH=<repository>/deployments/logging-json.yml``:
every log line is then one JSON object holding the message, level, time, logger, the
flow run and task run ids and names (Prefect's run loggers add those), ``structure``
(the structure a line is about, where there is one), ``host`` and ``worker``.
"""

from __future__ import annotations

import logging
import os
import socket

HOST = socket.gethostname()


class WorkerFields(logging.Filter):
    """Adds ``message`` (the formatted text), ``host``, ``worker`` (the Dask worker's name,
    or ``pid <n>`` outside one) and ``structure`` (None unless the line is about one) to
    every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the fields; keep the record (return True)."""
        record.message = record.getMessage()
        record.host = HOST
        record.worker = _worker_name()
        if not hasattr(record, "structure"):
            record.structure = None
        return True


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"
