"""Ranking results: the keys a screen or a workflow step orders structures by."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from atomforge.flows.store.records import StructureResult

RankKey = Literal["energy_per_atom", "energy", "gap"]
RANK_FIELDS: dict[str, str] = {
    "energy_per_atom": "energy_per_atom_eV",
    "energy": "energy_eV",
    "gap": "gap_eV",
}
"""The result field each rank key reads."""


class RankedStructure(BaseModel):
    """One line of a ranking. The whole result document (inputs, final structure, forces,
    files) is in the result store under ``id``."""

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


def rank(results: list[StructureResult], rank_by: RankKey) -> list[StructureResult]:
    """Return completed results sorted by ``rank_by`` (energies ascending, gap descending),
    then the others; a completed result without that value comes after those with one."""
    field = RANK_FIELDS[rank_by]
    sign = -1.0 if rank_by == "gap" else 1.0

    def key(result: StructureResult) -> tuple[bool, float]:
        value = getattr(result, field)
        return (value is None, sign * value if value is not None else 0.0)

    done = sorted((r for r in results if r.ok), key=key)
    return done + [r for r in results if not r.ok]
