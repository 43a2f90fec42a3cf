"""Input keys: one hash of everything that decides a calculation's result.

Two calculations with the same key (the same structure to 1e-6 Å and the same cell, the
same engine and engine version, the same parameters and options) give the same result,
so a stored completed one can be reused instead of computing again. Settings that change
how, not what, is computed (cores, the time limit) are left out.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from ase import Atoms

from atomforge.engines.parameters import CalculationParameters

POSITION_DECIMALS = 6
NOT_IN_KEY = frozenset({"cores", "timeout_seconds"})


def input_key(atoms: Atoms, params: CalculationParameters, engine_version: str) -> str:
    """Return the hex SHA-256 key of computing ``atoms`` with ``params`` on that version."""
    structure = {
        "numbers": atoms.numbers.tolist(),
        "positions": np.round(atoms.positions, POSITION_DECIMALS).tolist(),
        "cell": np.round(atoms.cell.array, POSITION_DECIMALS).tolist(),
        "pbc": atoms.pbc.tolist(),
    }
    if atoms.has("initial_magmoms"):
        structure["magmoms"] = np.round(atoms.get_initial_magnetic_moments(), 6).tolist()
    payload = {
        "structure": structure,
        "engine_version": engine_version,
        "parameters": params.model_dump(mode="json", exclude=set(NOT_IN_KEY)),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
