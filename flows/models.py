"""Pydantic models of flow parameters and result documents (the Prefect UI renders these)."""

from __future__ import annotations

from pathlib import PurePath

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atomforge.engines.registry import make_parameters
from atomforge.flows.form import simulation_parameters_model
from atomforge.flows.store.records import RunSummary, StructureResult

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_PARAMETERS",
    "RunOptions",
    "RunSummary",
    "SimulationParameters",
    "StructureResult",
    "StructureSource",
    "make_parameters",
]

SimulationParameters = simulation_parameters_model()
"""The flows' parameters form: the engine, shared fields, one options block per engine.

``make_parameters("xtb", kind="singlepoint")`` builds the engine's own model, which the
flows take as well; ``SimulationParameters(...).resolve()`` turns the form into it.
"""


class StructureSource(BaseModel):
    """Where the structures come from; give exactly one of: a file or folder path, inline
    XYZ/extended-XYZ text, or stored results (their final structures)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="Structure file (xyz, extxyz, cif, POSCAR...) or a folder of them."
    )
    text: str | None = Field(None, description="Inline structure text, e.g. an XYZ block.")
    format: str | None = Field(None, description="ASE format name when it cannot be guessed.")
    results: list[str] | None = Field(
        None,
        description="Stored results ('flow_run_id/id') whose final structures to compute; "
        "each new result records the one it started from as its parent.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StructureSource:
        if sum(given is not None for given in (self.path, self.text, self.results)) != 1:
            raise ValueError("give exactly one of 'path', 'text' or 'results'")
        return self


class RunOptions(BaseModel):
    """Where a run works and how a screen splits its structures."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str | None = Field(
        None,
        description="Folder under the work root for this run's working directories "
        "(default: the flow run id). Must stay inside the work root.",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="About this many structures per Dask task (default: one chunk per worker).",
    )
    skip_invalid: bool = Field(
        False, description="Screen: report invalid structures and go on instead of failing."
    )
    reuse: bool | None = Field(
        None,
        description="Reuse a stored completed result whose inputs are identical (structure, "
        "engine and version, parameters) instead of computing it again; default: "
        "ATOMFORGE_REUSE (true).",
    )
    max_failed_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Screen: end Failed when more than this fraction of the structures it "
        "computed did not complete (invalid ones skipped with skip_invalid do not count); "
        "default: ATOMFORGE_MAX_FAILED_FRACTION (0.5).",
    )

    @field_validator("run_dir")
    @classmethod
    def _inside_work_root(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = PurePath(value)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"run_dir {value!r} must be a relative path inside the work root")
        return value


DEFAULT_PARAMETERS = SimulationParameters()
DEFAULT_OPTIONS = RunOptions()
