"""The ``tblite`` engine: GFN-xTB in-process through tblite's ASE calculator."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import Hartree
from pydantic import Field

from atomforge.engines.ase_engine import AseEngine
from atomforge.engines.base import EngineOptions, installed_version
from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationParameters


class TbliteOptions(EngineOptions):
    """Options of tblite's ASE calculator."""

    method: Literal["GFN2-xTB", "GFN1-xTB", "IPEA1-xTB"] = Field(
        "GFN2-xTB", description="Tight-binding Hamiltonian."
    )
    accuracy: float = Field(1.0, gt=0, description="Numerical accuracy multiplier.")
    electronic_temperature: float = Field(
        300.0, gt=0, description="Electronic temperature in K for Fermi smearing."
    )
    max_iterations: int = Field(250, ge=1, description="Most SCC iterations.")


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
    outputs = frozenset({"gap_eV", "pressure_GPa"})
    max_atoms = 5000
    description = "tblite library (GFN2-xTB default) through its ASE calculator"
    requires = "the tblite Python package (installed with atomforge)"
    options_model = TbliteOptions

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError for uncovered elements (see :meth:`Engine.check`)."""
        super().check(atoms, params)
        if (atoms.numbers > 86).any():
            raise InputError("tblite: elements beyond radon are not covered by GFN-xTB")

    def make_calculator(self, params: CalculationParameters) -> Calculator:
        """Return a tblite calculator for the charge, multiplicity and options in ``params``."""
        from tblite.ase import TBLite

        opts: TbliteOptions = params.options
        return TBLite(
            method=opts.method,
            charge=params.charge,
            multiplicity=params.multiplicity,
            accuracy=opts.accuracy,
            electronic_temperature=opts.electronic_temperature,
            max_iterations=opts.max_iterations,
            verbosity=0,
        )

    def extra_properties(self, calc: Calculator) -> dict[str, Any]:
        """Return the HOMO-LUMO gap, charges and dipole."""
        res = calc._res
        return {
            "gap": homo_lumo_gap(res["orbital-energies"], res["orbital-occupations"]),
            "partial_charges": calc.results["charges"].tolist(),
            "dipole_eA": calc.results["dipole"].tolist(),
        }

    def version(self) -> str:
        """Return the installed tblite version."""
        installed = installed_version("tblite")
        return f"tblite {installed}" if installed else "tblite not installed"
