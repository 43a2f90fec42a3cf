"""A Dask worker preload for the worker processes of a command's local cluster.

Worker processes (``ATOMFORGE_DASK_PROCESSES``) share the terminal's process group with the
``atomforge`` command, so Ctrl-C reaches them too; it is the command's to handle (it cancels
the run, which stops the engines and closes the cluster). Here it only silences their
console logging, as it does the command's, instead of ending each with a traceback.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading

from atomforge.flows.interrupt import silence_console

MODULE = "atomforge.flows.worker_preload"


def _quiet(signum: int, frame: object) -> None:
    silence_console()


def dask_setup(worker: object) -> None:
    """Make SIGINT silence a worker process of its own instead of stopping it; do nothing
    in a worker that runs in the command's process (its threads)."""
    in_own_process = multiprocessing.parent_process() is not None
    if in_own_process and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _quiet)
