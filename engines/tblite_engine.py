"""The ``tblite`` engine: GFN-xTB in-process through tblite's ASE calculator."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import Hartree
from atomforge.engines.ase_engine import AseEngine
from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationParameters

METHODS = ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB")


def homo_lumo_gap(orbital_energies: np.ndarray, occupations: np.ndarray) -> float | None:
    """Return the HOMO-LUMO gap in eV from orbital energies (Hartree) and occupations."""
    occupied = orbital_energies[occupations > 1e-6]
    virtual = orbital_energies[occupations <= 1e-6]
    if not len(occupied) or not len(virtual):
        return None
    return float((virtual.min() - occupied.max()) * Hartree)


class TbliteEngine(AseEngine):
    """tblite's ASE calculator (GFN2-xTB by default), molecules and periodic systems."""

    name = "tblite"
    description = "tblite library (GFN2-xTB default) through its ASE calculator"
    known_options = frozenset({"method", "accuracy", "electronic_temperature", "max_iterations"})

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError for unknown methods or uncovered elements (see ``Engine.check``)."""
        super().check(atoms, params)
        method = str(params.options.get("method", "GFN2-xTB"))
        if method not in METHODS:
            raise InputError(f"tblite: unknown method {method!r} (known: {', '.join(METHODS)})")
        if (atoms.numbers > 86).any():
            raise InputError("tblite: elements beyond radon are not covered by GFN-xTB")

    def make_calculator(self, params: CalculationParameters) -> Calculator:
        """Return a tblite calculator for the charge, multiplicity and options in ``params``."""
        from tblite.ase import TBLite

        opts = params.options
        return TBLite(
            method=str(opts.get("method", "GFN2-xTB")),
            charge=params.charge,
            multiplicity=params.multiplicity,
            accuracy=float(opts.get("accuracy", 1.0)),
            electronic_temperature=float(opts.get("electronic_temperature", 300.0)),
            max_iterations=int(opts.get("max_iterations", 250)),
            verbosity=0,
        )

    def extra_properties(self, calc: Calculator) -> dict[str, Any]:
        """Return the energy in Hartree, the HOMO-LUMO gap, charges and dipole."""
        res = calc._res
        return {
            "energy_hartree": float(res["energy"]),
            "gap": homo_lumo_gap(res["orbital-energies"], res["orbital-occupations"]),
            "partial_charges": calc.results["charges"].tolist(),
            "dipole_eA": calc.results["dipole"].tolist(),
        }

    def version(self) -> str:
        """Return the installed tblite version."""
        return f"tblite {version('tblite')}"
