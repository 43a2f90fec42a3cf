"""Prefect's embedded API server for one command, tied to the command's life.

With ``ATOMFORGE_LOCAL_SERVER=false`` (and no ``PREFECT_API_URL``) a command runs its flow
on Prefect's embedded server, a uvicorn subprocess. Started the way Prefect starts it, that
process shares the terminal's process group (Ctrl-C would stop it before the run is marked
Cancelled), outlives a ``kill -9`` of the command, and every Dask worker process
(``ATOMFORGE_DASK_PROCESSES``) would start one of its own. :func:`start` starts it under
:mod:`atomforge.flows.watchdog` instead (a session of its own; stopped when the command
ends however it ends) and points the command and every process it starts at it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

from atomforge.deployments.api_trust import trust_plain_http
from atomforge.flows.settings import get_settings
from atomforge.flows.watchdog import watched


class _WatchedSubprocess:
    """The ``subprocess`` module as Prefect's server module sees it while :func:`start`
    runs: ``Popen`` starts its command under a watchdog of this process."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Return the started watchdog of ``args`` (it exits with their exit code)."""
        return subprocess.Popen(watched(args), **kwargs)


def start() -> str:
    """Start Prefect's embedded API server under a watchdog of this process, and set
    ``PREFECT_API_URL`` to it here and for the processes this one starts (Dask workers
    then start no server); return that URL. Prefect stops the server when this process
    exits; the watchdog, if it is killed."""
    from prefect.context import refresh_global_settings_context
    from prefect.server.api import server

    embedded = server.SubprocessASGIServer()
    server.subprocess = _WatchedSubprocess()
    try:
        embedded.start()
    finally:
        server.subprocess = subprocess
    os.environ["PREFECT_API_URL"] = embedded.api_url
    trust_plain_http(os.environ, get_settings().home.expanduser())
    refresh_global_settings_context()
    return embedded.api_url
