"""The parameters form of the flows: one flat model the Prefect UI can render.

Prefect's UI renders neither a ``oneOf`` nor a discriminated union as a form, so the
flows take :class:`SimulationParameters`: the engine as a choice, the fields every
engine shares, and one block of options per engine, named after it (only the chosen
engine's block is used). It also takes the engine-specific shape everywhere else in
atomforge uses, ``{"engine": "espresso", "options": {...}}`` or the model
:func:`make_parameters` returns, and :meth:`FormBase.resolve` turns it into that model.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.registry import engine_classes, engine_names, parse_parameters

SHARED_FIELDS = tuple(
    name for name in CalculationParameters.model_fields if name not in ("engine", "options")
)


class FormBase(BaseModel):
    """What every parameters form does: accept the engine-specific shape, and resolve."""

    model_config = ConfigDict(extra="forbid")

    engine: str
    options: dict[str, Any] | None = Field(
        None,
        description="The chosen engine's options in one mapping, the shape of YAML specs, "
        "the CLI's -o and Python; merged into the engine's block below, whose values win.",
    )

    @model_validator(mode="before")
    @classmethod
    def _engine_specific_shape(cls, data: Any) -> Any:
        """Return ``options`` (or an engine-specific model) moved to the engine's block."""
        if isinstance(data, CalculationParameters):
            data = data.model_dump(mode="json")
        if isinstance(data, dict) and "options" in data:
            data = dict(data)
            options = data.pop("options")
            engine = data.get("engine", "xtb")
            if options is not None:
                block = data.get(engine)
                block = block.model_dump() if isinstance(block, BaseModel) else block or {}
                data[engine] = {**options, **block}
        return data

    def resolve(self) -> CalculationParameters:
        """Return the parameters of the chosen engine (its own model, options validated)."""
        shared = self.model_dump(include=set(SHARED_FIELDS))
        options = getattr(self, self.engine).model_dump(exclude_unset=True)
        return parse_parameters({**shared, "engine": self.engine, "options": options})


@cache
def simulation_parameters_model() -> type[FormBase]:
    """Return the flat parameters form, built from the registered engines."""
    names = engine_names()
    shared = {
        name: (CalculationParameters.model_fields[name].annotation, field)
        for name, field in CalculationParameters.model_fields.items()
        if name in SHARED_FIELDS
    }
    blocks = {
        name: (
            cls.options_model,
            Field(
                default_factory=cls.options_model,
                description=f"Options of {name}, used when engine is {name}: {cls.description}.",
            ),
        )
        for name, cls in sorted(engine_classes().items())
    }
    engine = (
        Literal[tuple(names)],
        Field(
            "xtb",
            description="The engine that computes each structure; fill its options "
            "block below (atomforge engines lists them).",
        ),
    )
    return create_model(
        "SimulationParameters",
        __base__=FormBase,
        __module__="atomforge.flows.models",
        __doc__="How to compute each structure: the engine, the shared fields, its options.",
        engine=engine,
        **shared,
        **blocks,
    )
