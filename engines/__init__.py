"""Engine adapters: each turns ASE ``Atoms`` plus parameters into results in four steps."""

from __future__ import annotations

from atomforge.engines.base import Engine
from atomforge.engines.errors import InputError


def _registry() -> dict[str, type[Engine]]:
    """Return the engine classes by name."""
    from atomforge.engines.emt import EmtEngine
    from atomforge.engines.tblite_engine import TbliteEngine
    from atomforge.engines.xtb import XtbEngine

    return {cls.name: cls for cls in (XtbEngine, TbliteEngine, EmtEngine)}


def engine_names() -> list[str]:
    """Return the names of all engines, sorted."""
    return sorted(_registry())


def get_engine(name: str) -> Engine:
    """Return a new engine adapter for ``name``, or raise InputError for an unknown one."""
    registry = _registry()
    if name not in registry:
        raise InputError(f"unknown engine {name!r} (available: {', '.join(sorted(registry))})")
    return registry[name]()
