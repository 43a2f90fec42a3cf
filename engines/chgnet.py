"""The ``chgnet`` engine: the CHGNet universal machine-learned potential, through ASE.

CHGNet (PyPI ``chgnet``) ships its pretrained weights inside its wheel (models 0.3.0,
0.2.0 and r2scan), so nothing is downloaded at run time. It comes with torch in the ``ml``
extra; neither is imported before a runner process computes something. Each runner
process loads a model once (:func:`load_model`) and shares it between the structures of
its chunk; singlepoints go through the model in batches (:meth:`ChgnetEngine.predict`),
optimizations and MD one structure at a time with ASE.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ase import Atoms, units
from ase.calculators.calculator import Calculator
from pydantic import Field, field_validator

from atomforge.engines.ase_engine import AseEngine
from atomforge.engines.base import installed_version
from atomforge.engines.errors import InputError
from atomforge.engines.ml_potential import (
    INSTALL_HINT,
    MlOptions,
    absolute_path,
    require_packages,
    resolve_device,
)
from atomforge.engines.parameters import CalculationKind, CalculationParameters

if TYPE_CHECKING:
    from chgnet.model import CHGNet

SHIPPED_MODELS = ("0.3.0", "0.2.0", "r2scan")
"""The models inside the chgnet wheel."""
MAX_ATOMIC_NUMBER = 94
"""CHGNet's element embedding covers H to Pu."""
BATCH_SIZE = 16
"""Structures per forward pass of a batched singlepoint."""
PACKAGES = {"torch": "torch", "chgnet": "chgnet"}
"""What chgnet needs installed: its Python modules and the packages that hold them."""


class ChgnetOptions(MlOptions):
    """Options of CHGNet: the model, the device, and the integrator for kind ``md``."""

    model: str = Field(
        "0.3.0",
        description="A model shipped with chgnet (0.3.0, 0.2.0, r2scan) or the path of a "
        "CHGNet model file (.pth.tar).",
    )

    @field_validator("model")
    @classmethod
    def _absolute_model_path(cls, model: str) -> str:
        """Return a model file's path made absolute (runners work in other folders)."""
        return model if model in SHIPPED_MODELS else absolute_path(model)


@cache
def load_model(model: str, device: str) -> CHGNet:
    """Return CHGNet model ``model`` (a shipped name or a file) on ``device``, once a process."""
    from chgnet.model import CHGNet

    if model in SHIPPED_MODELS:
        return CHGNet.load(model_name=model, use_device=device, verbose=False)
    return CHGNet.from_file(model).to(device)


def calculator_results(prediction: dict[str, Any], n_atoms: int, model: CHGNet) -> dict:
    """Return one structure's prediction in ASE units, as CHGNet's ASE calculator stores it."""
    energy = prediction["e"] * (n_atoms if model.is_intensive else 1)
    return {
        "energy": energy,
        "free_energy": energy,
        "forces": prediction["f"],
        "stress": prediction["s"] * units.GPa,
        "magmoms": prediction["m"],
    }


class ChgnetEngine(AseEngine):
    """CHGNet (a universal graph-network potential, with magnetic moments); crystals only."""

    name = "chgnet"
    outputs = frozenset({"pressure_GPa"})
    description = "CHGNet universal machine-learned potential (pretrained on the MPtrj set)"
    requires = f"the ml extra, torch and chgnet (about 1.1 GB): {INSTALL_HINT}"
    options_model = ChgnetOptions
    kinds = frozenset(CalculationKind)
    supports_molecules = False
    supports_charge = False

    def check_installed(self, params: CalculationParameters) -> None:
        """Raise InputError when torch or chgnet is missing, or the model file is."""
        require_packages(self.name, PACKAGES)
        model = params.options.model
        if model not in SHIPPED_MODELS and not Path(model).is_file():
            shipped = ", ".join(SHIPPED_MODELS)
            raise InputError(f"chgnet: model {model!r} is not a file nor one of {shipped}")

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError for a cell not periodic in 3D, an element beyond Pu, or md
        options that miss something (see :meth:`Engine.check`)."""
        super().check(atoms, params)
        if not atoms.pbc.all():
            raise InputError(
                "chgnet: needs a cell periodic in all three directions (CHGNet is trained "
                "on crystals; give a slab vacuum and pbc=True)"
            )
        if (atoms.numbers > MAX_ATOMIC_NUMBER).any():
            raise InputError("chgnet: elements beyond plutonium are not covered by CHGNet")
        problem = params.options.md_problem() if params.kind is CalculationKind.md else None
        if problem:
            raise InputError(f"chgnet: {problem}")

    def make_calculator(self, params: CalculationParameters) -> Calculator:
        """Return CHGNet's ASE calculator on the process's shared model."""
        from chgnet.model.dynamics import CHGNetCalculator

        opts: ChgnetOptions = params.options
        device = resolve_device(self.name, opts.device)
        model = load_model(opts.model, device)
        with redirect_stdout(io.StringIO()):
            return CHGNetCalculator(model=model, use_device=device)

    def predict(self, structures: list[Atoms], params: CalculationParameters) -> list[dict]:
        """Return the calculator results of each structure, computed in batches."""
        from pymatgen.io.ase import AseAtomsAdaptor

        opts: ChgnetOptions = params.options
        model = load_model(opts.model, resolve_device(self.name, opts.device))
        crystals = [AseAtomsAdaptor.get_structure(atoms) for atoms in structures]
        predictions = model.predict_structure(crystals, task="efsm", batch_size=BATCH_SIZE)
        if isinstance(predictions, dict):
            predictions = [predictions]
        return [
            calculator_results(prediction, len(atoms), model)
            for prediction, atoms in zip(predictions, structures, strict=True)
        ]

    def version(self) -> str:
        """Return the installed chgnet version (the model is in the options)."""
        installed = installed_version("chgnet")
        return f"chgnet {installed}" if installed else "chgnet not installed"
