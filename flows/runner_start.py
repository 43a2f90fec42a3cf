"""Start a batch engine's warm runner zygote as a run begins, before its flow plans.

The zygote (:mod:`atomforge.engines.warm_runner`) imports ASE's runner and the engine's
calculator, about 0.9 s of CPU. Started where the flow run starts (``atomforge run``,
``screen`` and ``workflow``'s first step, a request's child in the warm consumer), those
imports overlap the run's creation and its first steps, and in a warm process forked for
the run (the local server's command child, the consumer's request child) the zygote is
forked from it, with ASE imported already. The flow's own start before its first chunk
then finds it. This only saves time: a failure here is printed and left to the run,
which meets it again and reports it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from atomforge.engines.errors import AtomforgeError
from atomforge.engines.parameters import CalculationParameters


def start_runner(params: CalculationParameters, fork: bool = False) -> None:
    """Start the warm runner zygote of ``params``' engine now if it is a batch engine whose
    chunks will run in this process (see :func:`atomforge.engines.runloop.prepare_runner`;
    with ``fork``, forked from this process, see
    :func:`atomforge.engines.warm_runner.prewarm`). A run whose structures all turn out to
    be reused leaves it unused. Returns None."""
    from atomforge.engines import get_engine
    from atomforge.engines.runloop import prepare_runner
    from atomforge.flows.scheduling.dask_runner import runs_chunks_here
    from atomforge.flows.settings import get_settings

    try:
        if runs_chunks_here(get_settings()):
            prepare_runner(get_engine(params.engine), params, fork)
    except Exception as exc:  # the run meets it again and reports it
        print(f"runner not started ahead: {type(exc).__name__}: {exc}", file=sys.stderr)


def start_runner_of_run(flow_parameters: Mapping[str, Any], fork: bool = False) -> None:
    """Start the zygote (:func:`start_runner`, ``fork`` as it says) of a flow run whose
    parameters, as the API holds them, give a ``parameters`` form (``simulate``,
    ``screen``); a run without one, or whose form does not validate (its flow reports
    that), starts none. Returns None."""
    from atomforge.flows.models import SimulationParameters

    form = flow_parameters.get("parameters")
    if not isinstance(form, Mapping):
        return
    try:
        params = SimulationParameters.model_validate(form).resolve()
    except (ValueError, AtomforgeError):
        return
    start_runner(params, fork)
