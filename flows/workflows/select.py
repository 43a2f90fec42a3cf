"""``select``: which of a step's results go on to the next step (a filter, then the best N)."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atomforge.flows.ranking import RANK_FIELDS, RankKey, rank
from atomforge.flows.store.records import StructureResult

ALWAYS_PRODUCED = frozenset(
    {"energy_eV", "energy_per_atom_eV", "max_force_eV_per_A", "converged", "n_atoms", "n_steps"}
)
"""Result fields every engine fills; others depend on the engine (its ``outputs``)."""
SELECTABLE = ALWAYS_PRODUCED | {"gap_eV", "fermi_level_eV", "pressure_GPa", "magnetic_moment"}
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
COMPARISON = re.compile(r"^(\w+)\s*(<=|>=|==|!=|<|>)\s*(\S+)$")
FLAG = re.compile(r"^(not\s+)?(\w+)$")


@dataclass(frozen=True)
class Condition:
    """One clause of a ``where``: a field compared with a number, or a field that is true."""

    field: str
    test: Callable[[float, float], bool]
    value: float

    def holds(self, result: StructureResult) -> bool:
        """Return True when ``result`` has the field and it passes the test."""
        actual = getattr(result, self.field)
        return actual is not None and self.test(float(actual), self.value)


def _number(text: str, clause: str) -> float:
    """Return ``text`` as a number (true/false as 1/0); ValueError naming ``clause``."""
    if text.lower() in {"true", "false"}:
        return float(text.lower() == "true")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"where {clause!r}: {text!r} is not a number") from None


def _field(name: str, clause: str) -> str:
    """Return ``name`` if a result field can be selected on; ValueError otherwise."""
    if name not in SELECTABLE:
        raise ValueError(
            f"where {clause!r}: unknown field {name!r} (one of {', '.join(sorted(SELECTABLE))})"
        )
    return name


def parse_where(text: str) -> list[Condition]:
    """Return the conditions of ``text``: clauses joined by ``and``, each ``field``,
    ``not field`` or ``field <op> number`` (op one of < <= > >= == !=)."""
    conditions = []
    for clause in re.split(r"\s+and\s+", text.strip()):
        if match := COMPARISON.match(clause):
            name, symbol, raw = match.groups()
            value = _number(raw, clause)
            conditions.append(Condition(_field(name, clause), OPERATORS[symbol], value))
        elif match := FLAG.match(clause):
            negated, name = match.groups()
            test = operator.eq if negated else operator.ne
            conditions.append(Condition(_field(name, clause), test, 0.0))
        else:
            raise ValueError(f"where {clause!r}: write 'field', 'not field' or 'field > number'")
    return conditions


class Select(BaseModel):
    """Which results of the step before go on: those passing ``where``, then the ``top`` best."""

    model_config = ConfigDict(extra="forbid")

    top: int | None = Field(None, ge=1, description="Keep the best N by 'by'.")
    by: RankKey = Field(
        "energy_per_atom", description="What 'top' ranks by: energies lowest first, gap highest."
    )
    where: str | None = Field(
        None,
        description="Keep results that pass, e.g. 'converged', 'gap_eV > 3', "
        "'converged and energy_per_atom_eV < -4'.",
    )

    @field_validator("where")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_where(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> Select:
        if self.top is None and self.where is None:
            raise ValueError("select needs 'top', 'where' or both")
        return self

    def fields(self) -> set[str]:
        """Return the result fields this selection reads."""
        read = {condition.field for condition in parse_where(self.where)} if self.where else set()
        return read | ({RANK_FIELDS[self.by]} if self.top else set())

    def apply(self, results: list[StructureResult]) -> list[StructureResult]:
        """Return the completed results that pass ``where``, best first, at most ``top``."""
        conditions = parse_where(self.where) if self.where else []
        passed = [r for r in results if r.ok and all(c.holds(r) for c in conditions)]
        if self.top is None:
            return passed
        ranked = [r for r in rank(passed, self.by) if getattr(r, RANK_FIELDS[self.by]) is not None]
        return ranked[: self.top]
