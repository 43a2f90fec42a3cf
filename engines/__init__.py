"""Engine adapters: each turns ASE ``Atoms`` plus parameters into results in four steps."""

from __future__ import annotations

from atomforge.engines.base import Engine
from atomforge.engines.errors import InputError
from atomforge.engines.registry import engine_names, get_engine, make_parameters, parse_parameters

__all__ = [
    "Engine",
    "InputError",
    "engine_names",
    "get_engine",
    "make_parameters",
    "parse_parameters",
]
