"""The ``simulate`` flow: one structure through validate -> prepare -> run -> parse.

Like every atomforge flow it is ``async``: run it with ``asyncio.run(simulate(...))``, or
``await`` it. Prefect's sync flow engine joins its heartbeat thread when a run ends, which
sleeps in one-second steps, so every sync flow run lasts at least a second; the async
engine does not wait for it.
"""

from __future__ import annotations

from prefect import flow

from atomforge.engines.errors import EngineError
from atomforge.flows.models import (
    DEFAULT_OPTIONS,
    DEFAULT_PARAMETERS,
    RunOptions,
    SimulationParameters,
    StructureResult,
    StructureSource,
)
from atomforge.flows.pipeline import run_structures
from atomforge.flows.scheduling.dask_runner import simulation_flow_options


@flow(name="simulate", **simulation_flow_options())
async def simulate(
    source: StructureSource,
    parameters: SimulationParameters = DEFAULT_PARAMETERS,
    options: RunOptions = DEFAULT_OPTIONS,
) -> StructureResult:
    """Compute one structure; return its result document (the flow fails if it did not finish).

    Args:
        source: The structure: a file, inline text, or a stored result (give exactly one).
        parameters: How to compute it: the engine, the shared fields, the engine's options.
        options: Where the run works, and whether a stored identical result is reused.
    """
    title = f"{parameters.engine} {parameters.kind.value}"
    outcome = await run_structures(source, parameters.resolve(), options, title, single=True)
    await outcome.publish("simulate", title)
    result = outcome.results[0]
    if not result.ok:
        raise EngineError(f"{result.name}: {result.status}: {result.message}")
    return result
