"""The ``simulate`` flow: one structure through validate -> prepare -> run -> parse."""

from __future__ import annotations

from prefect import flow

from engines.errors import EngineError, InputError
from flows.models import (
    DEFAULT_OPTIONS,
    DEFAULT_PARAMETERS,
    RunOptions,
    SimulationParameters,
    StructureResult,
    StructureSource,
)
from flows.pipeline import run_structures
from flows.runner import simulation_flow_options


@flow(name="simulate", **simulation_flow_options())
def simulate(
    structure: StructureSource,
    parameters: SimulationParameters = DEFAULT_PARAMETERS,
    options: RunOptions = DEFAULT_OPTIONS,
) -> StructureResult:
    """Compute one structure; return its result document (the flow fails if it did not finish)."""
    title = f"{parameters.engine} {parameters.kind.value}"
    outcome = run_structures(structure, parameters, options, title)
    if len(outcome.results) != 1:
        raise InputError(f"simulate takes one structure, got {len(outcome.results)}: use screen")
    outcome.publish("simulate", title)
    result = outcome.results[0]
    if not result.ok:
        raise EngineError(f"{result.name}: {result.status}: {result.message}")
    return result
