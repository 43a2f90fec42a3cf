"""The ``screen`` flow: many structures through the same four steps, ranked at the end.

``async`` for the reason given in :mod:`atomforge.flows.simulate`: ``asyncio.run(screen(...))``.
"""

from __future__ import annotations

import asyncio
from functools import partial

from prefect import flow
from pydantic import BaseModel, Field

from atomforge.flows.models import (
    DEFAULT_OPTIONS,
    DEFAULT_PARAMETERS,
    RunOptions,
    SimulationParameters,
    StructureSource,
)
from atomforge.flows.pipeline import run_structures
from atomforge.flows.ranking import RANK_FIELDS, RankedStructure, RankKey, rank
from atomforge.flows.scheduling.dask_runner import simulation_flow_options
from atomforge.flows.ui import artifacts, plots


class ScreenReport(BaseModel):
    """A screen's ranking, best first by ``rank_by``; failed structures come last.

    It holds one line per structure, not the whole documents: a screen of hundreds
    would otherwise store every structure and force twice, once more in Prefect's copy
    of the flow's result. ``atomforge.flows.store.files.iter_results(root, flow_run_id)``
    reads them all.
    """

    flow_run_id: str
    rank_by: RankKey
    n_structures: int
    n_completed: int
    results: list[RankedStructure] = Field(default_factory=list)


@flow(name="screen", **simulation_flow_options())
async def screen(
    source: StructureSource,
    parameters: SimulationParameters = DEFAULT_PARAMETERS,
    options: RunOptions = DEFAULT_OPTIONS,
    rank_by: RankKey = "energy_per_atom",
) -> ScreenReport:
    """Compute every structure of ``source`` and return them ranked by ``rank_by``.

    The run's state message counts the completed and failed structures. The run ends
    Failed, still carrying its report, when more than ``options.max_failed_fraction``
    (default ``ATOMFORGE_MAX_FAILED_FRACTION``, 0.5) of the structures it computed did not
    complete; invalid structures skipped with ``skip_invalid`` count neither way.

    Args:
        source: The structures: a folder of structure files, a multi-frame file, inline
            text, or stored results (give exactly one).
        parameters: How to compute each structure: the engine, the shared fields, the
            engine's options block.
        options: Where the run works, how it splits the structures, reuse, invalid ones.
        rank_by: The ranking: energy per atom or energy (lowest first), or the HOMO-LUMO
            gap (highest first).
    """
    title = f"screen: {parameters.engine} {parameters.kind.value}, ranked by {rank_by}"
    outcome = await run_structures(source, parameters.resolve(), options, title)
    ranked = rank(outcome.results, rank_by)
    draw = partial(plots.ranking_plots, ranked, RANK_FIELDS[rank_by], outcome.results_dir)
    await asyncio.gather(
        outcome.publish("screen", title, ranked, RANK_FIELDS[rank_by]),
        artifacts.publish_plots("screen", title, draw),
    )
    report = ScreenReport(
        flow_run_id=ranked[0].flow_run_id if ranked else "",
        rank_by=rank_by,
        n_structures=len(ranked),
        n_completed=sum(r.ok for r in ranked),
        results=[RankedStructure.of(result) for result in ranked],
    )
    return outcome.final_state(report)
