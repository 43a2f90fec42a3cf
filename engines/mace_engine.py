"""The ``mace`` engine: a MACE model file of the user's, through mace-torch's ASE calculator.

mace-torch ships no model, and its ``mace_mp()``/``mace_off()`` download one from the
internet, so this engine takes only a file: option ``model``, a MACE model saved with
``torch.save`` (what mace-torch's training writes, and what ``MACECalculator(model_paths=
...)`` loads). Validation reads the file's class and elements without torch
(:mod:`.saved_model`); each runner process loads the model once (:func:`load_model`) and
gives every structure of its chunk a ``MACECalculator`` on it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import chemical_symbols
from pydantic import Field, field_validator

from atomforge.engines.ase_engine import AseEngine
from atomforge.engines.base import EngineResults, installed_version
from atomforge.engines.errors import InputError
from atomforge.engines.ml_potential import (
    INSTALL_HINT,
    MlOptions,
    absolute_path,
    require_packages,
    resolve_device,
)
from atomforge.engines.parameters import CalculationKind, CalculationParameters
from atomforge.engines.saved_model import SavedModel, read_saved_model

if TYPE_CHECKING:
    from torch.nn import Module

PACKAGES = {"torch": "torch", "mace": "mace-torch"}
"""What mace needs installed: its Python modules and the packages that hold them."""


class MaceOptions(MlOptions):
    """Options of MACE: the model file, its precision, the device, and md's integrator."""

    model: str = Field(
        "",
        description="Path of a MACE model file (saved with torch.save, as mace-torch's "
        "MACECalculator(model_paths=...) loads it). Required: none ships with mace-torch.",
    )
    dtype: Literal["model", "float64", "float32"] = Field(
        "model",
        description="Precision of the model: the file's own, float64 (steadier "
        "optimizations) or float32 (faster MD).",
    )

    @field_validator("model")
    @classmethod
    def _absolute_model_path(cls, model: str) -> str:
        """Return the model file's path made absolute (runners work in other folders)."""
        return absolute_path(model) if model else model


def mace_model(path: str) -> SavedModel:
    """Return what the MACE model file at ``path`` holds; InputError (one line) for a
    missing file or one that holds no MACE model."""
    try:
        saved = read_saved_model(Path(path))
    except InputError as exc:
        raise InputError(f"mace: model {exc}") from None
    if saved.module.partition(".")[0] != "mace" or not saved.atomic_numbers:
        raise InputError(
            f"mace: {path} is not a MACE model file (it holds {saved.module}.{saved.name})"
        )
    return saved


@cache
def load_model(path: str, device: str, dtype: str) -> Module:
    """Return the MACE model in file ``path`` on ``device`` in ``dtype``, once a process."""
    import torch

    model = torch.load(path, map_location=device, weights_only=False)
    if dtype == "float64":
        model = model.double()
    if dtype == "float32":
        model = model.float()
    return model


class MaceEngine(AseEngine):
    """A MACE model of the user's (molecules or crystals, whatever it was trained on)."""

    name = "mace"
    outputs = frozenset({"pressure_GPa"})
    description = "MACE machine-learned potential from a model file of yours (mace-torch)"
    requires = f"the ml extra, torch and mace-torch, and a MACE model file: {INSTALL_HINT}"
    options_model = MaceOptions
    kinds = frozenset(CalculationKind)
    supports_charge = False

    def check_installed(self, params: CalculationParameters) -> None:
        """Raise InputError when torch or mace-torch is missing, or the model file given
        is missing or not a MACE model."""
        require_packages(self.name, PACKAGES)
        if params.options.model:
            mace_model(params.options.model)

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError without a model file, for elements the model does not cover,
        or md options that miss something (see :meth:`Engine.check`)."""
        super().check(atoms, params)
        opts: MaceOptions = params.options
        if not opts.model:
            raise InputError("mace: give a MACE model file: -o model=PATH")
        covered = set(mace_model(opts.model).atomic_numbers)
        missing = sorted(set(atoms.numbers.tolist()) - covered)
        if missing:
            names = ", ".join(chemical_symbols[z] for z in missing)
            has = ", ".join(chemical_symbols[z] for z in sorted(covered))
            raise InputError(f"mace: the model does not cover {names} (has: {has})")
        problem = opts.md_problem() if params.kind is CalculationKind.md else None
        if problem:
            raise InputError(f"mace: {problem}")

    def make_calculator(self, params: CalculationParameters) -> Calculator:
        """Return mace-torch's ASE calculator on the process's shared model."""
        from mace.calculators import MACECalculator

        opts: MaceOptions = params.options
        device = resolve_device(self.name, opts.device)
        model = load_model(opts.model, device, opts.dtype)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return MACECalculator(models=model, device=device, default_dtype=dtype)

    def read_results(self, directory: Path, params: CalculationParameters) -> EngineResults:
        """Return the runner's results, without the stress MACE also reports for a structure
        not periodic in all three directions (where it means nothing)."""
        results = super().read_results(directory, params)
        if not results.atoms.pbc.all():
            results.stress = None
        return results

    def version(self) -> str:
        """Return the installed mace-torch version (the model is in the options)."""
        installed = installed_version("mace-torch")
        return f"mace-torch {installed}" if installed else "mace-torch not installed"
