"""Exceptions that tell bad input, engine failures and stopped runs apart.

The split matters for retries: only :class:`EngineError` with ``retryable=True``
is worth a second attempt; bad input and deliberate stops never are.
"""

from __future__ import annotations


class AtomforgeError(Exception):
    """Base class of every error atomforge raises on purpose."""


class InputError(AtomforgeError, ValueError):
    """The structure or the parameters cannot be simulated; fix the input."""


class EngineError(AtomforgeError):
    """The engine ran but did not produce a result.

    Parameters
    ----------
    message
        One line saying what went wrong.
    retryable
        True when another attempt may succeed (the process was killed from outside,
        could not be started, or died on a signal), False for deterministic failures.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class RunStopped(AtomforgeError):
    """The run was cancelled or crashed and its engines were stopped on purpose."""


class WorkflowError(AtomforgeError):
    """A workflow cannot go on: a step has nothing left to compute, or its run failed."""
