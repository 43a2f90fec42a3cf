"""The ``emt`` engine: ASE's effective-medium theory for fcc metals (and a few light atoms)."""

from __future__ import annotations

import ase
from ase import Atoms
from ase.calculators.emt import EMT, parameters

from atomforge.engines.ase_engine import AseEngine
from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationParameters


class EmtEngine(AseEngine):
    """ASE's EMT calculator: cheap, for Al, Cu, Ag, Au, Ni, Pd, Pt (and H, C, N, O)."""

    name = "emt"
    outputs = frozenset({"pressure_GPa"})
    description = "ASE effective-medium theory (fcc metals); no charge or spin"
    requires = "nothing beyond ASE"
    supports_charge = False

    def check(self, atoms: Atoms, params: CalculationParameters) -> None:
        """Raise InputError for elements EMT has no parameters for (see :meth:`Engine.check`)."""
        super().check(atoms, params)
        missing = sorted(set(atoms.get_chemical_symbols()) - set(parameters))
        if missing:
            raise InputError(
                f"emt: no parameters for {', '.join(missing)} (has: {', '.join(parameters)})"
            )

    def make_calculator(self, params: CalculationParameters) -> EMT:
        """Return an EMT calculator."""
        return EMT()

    def version(self) -> str:
        """Return the ASE version that provides EMT."""
        return f"ase {ase.__version__}"
