"""Engine adapters: each turns ASE ``Atoms`` plus parameters into results in four steps.

The names below are loaded on first use (PEP 562), so that importing a light submodule
such as :mod:`atomforge.engines.errors` does not import ASE and every engine.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atomforge.engines.base import Engine
    from atomforge.engines.errors import InputError
    from atomforge.engines.registry import (
        engine_names,
        get_engine,
        make_parameters,
        parse_parameters,
    )

__all__ = [
    "Engine",
    "InputError",
    "engine_names",
    "get_engine",
    "make_parameters",
    "parse_parameters",
]
_HOMES = {
    "Engine": "base",
    "InputError": "errors",
    "engine_names": "registry",
    "get_engine": "registry",
    "make_parameters": "registry",
    "parse_parameters": "registry",
}


def __getattr__(name: str) -> Any:
    """Return one of the names above, importing its module now (module ``__getattr__``)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
