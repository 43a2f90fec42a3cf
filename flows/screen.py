"""The ``screen`` flow: many structures through the same four steps, ranked at the end.

``async`` for the reason given in :mod:`atomforge.flows.simulate`: ``asyncio.run(screen(...))``.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

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

RankKey = Literal["energy_per_atom", "energy", "gap"]


class RankedStructure(BaseModel):
    """One line of a screen's ranking. The whole result document (inputs, final structure,
    forces, files) is in the result store under ``id``."""

    id: str
    name: str
    formula: str
    status: str
    message: str = ""
    energy_eV: float | None = None
    energy_hartree: float | None = None
    energy_per_atom_eV: float | None = None
    gap_eV: float | None = None
    converged: bool | None = None

    @classmethod
    def of(cls, result: StructureResult) -> RankedStructure:
        """Return the ranking line of ``result``."""
        return cls(**result.model_dump(include=set(cls.model_fields)))


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


def rank(results: list[StructureResult], rank_by: RankKey) -> list[StructureResult]:
    """Return completed results sorted by ``rank_by`` (energies ascending, gap descending)."""
    key = {
        "energy_per_atom": lambda r: r.energy_per_atom_eV,
        "energy": lambda r: r.energy_eV,
        "gap": lambda r: -(r.gap_eV if r.gap_eV is not None else float("-inf")),
    }[rank_by]
    done = sorted((r for r in results if r.ok), key=key)
    return done + [r for r in results if not r.ok]


@flow(name="screen", **simulation_flow_options())
async def screen(
    source: StructureSource,
    parameters: SimulationParameters = DEFAULT_PARAMETERS,
    options: RunOptions = DEFAULT_OPTIONS,
    rank_by: RankKey = "energy_per_atom",
) -> ScreenReport:
    """Compute every structure of ``source`` and return them ranked by ``rank_by``."""
    title = f"screen: {parameters.engine} {parameters.kind.value}, ranked by {rank_by}"
    outcome = await run_structures(source, parameters.resolve(), options, title)
    ranked = rank(outcome.results, rank_by)
    await outcome.publish("screen", title, ranked)
    return ScreenReport(
        flow_run_id=ranked[0].flow_run_id if ranked else "",
        rank_by=rank_by,
        n_structures=len(ranked),
        n_completed=sum(r.ok for r in ranked),
        results=[RankedStructure.of(result) for result in ranked],
    )
