"""validate's checks: every structure of a source, against the geometry rules and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from atomforge.engines import get_engine
from atomforge.engines.base import Engine
from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.structures import (
    STRUCTURE_SUFFIXES,
    NamedStructure,
    check_electrons,
    check_geometry,
    read_structures,
)
from atomforge.flows.models import StructureSource
from atomforge.flows.settings import Settings, get_settings
from atomforge.flows.store.files import load_structures


@dataclass
class ValidatedInput:
    """Structures that passed validation, and those rejected (when asked to skip them)."""

    structures: list[NamedStructure]
    rejected: list[tuple[NamedStructure, str]] = field(default_factory=list)


def validate_structure(
    structure: NamedStructure, params: CalculationParameters, engine: Engine, min_distance: float
) -> None:
    """Raise InputError unless ``engine`` can compute ``structure`` with ``params``.

    The engine's own checks (kinds, size limit, elements) come first: they are cheap, and a
    structure too large for the engine is refused before its geometry is looked at.
    """
    try:
        engine.check(structure.atoms, params)
    except InputError as exc:
        raise InputError(f"{structure.name}: {exc}") from None
    check_geometry(structure.atoms, structure.name, min_distance)
    if engine.supports_charge:
        check_electrons(structure.atoms, params.charge, params.multiplicity, structure.name)


def check_input_path(path: str, settings: Settings) -> None:
    """Raise InputError unless ``path`` (a file, or a folder's structure files) lies under
    the input roots, links resolved, and no file is over the size limit. Nothing is read."""
    resolved = Path(path).expanduser().resolve()
    roots = settings.resolved_input_roots()
    files = [resolved]
    if resolved.is_dir():
        files = [p.resolve() for p in resolved.iterdir() if p.suffix in STRUCTURE_SUFFIXES]
    limit = settings.max_input_mb * 1e6
    for file in [resolved, *files]:
        if not any(file.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(root) for root in roots)
            raise InputError(
                f"{path}: outside the folders runs may read ({allowed}; ATOMFORGE_INPUT_ROOTS)"
            )
        if file.is_file() and file.stat().st_size > limit:
            raise InputError(
                f"{file}: {file.stat().st_size / 1e6:.0f} MB, over the input limit of "
                f"{settings.max_input_mb:g} MB (ATOMFORGE_MAX_INPUT_MB)"
            )


def check_inputs(
    source: StructureSource, params: CalculationParameters, skip_invalid: bool = False
) -> ValidatedInput:
    """Return the structures of ``source`` that pass every check; raise InputError otherwise.

    With ``skip_invalid`` an invalid structure, or an unreadable file of a folder, is set
    aside with its reason instead.
    """
    engine = get_engine(params.engine)
    engine.check_installed(params)
    min_distance = get_settings().min_distance
    rejected: list[tuple[NamedStructure, str]] = []
    if source.results is not None:
        root = get_settings().resolved_results_root()
        structures = load_structures(root, source.results)
    else:
        if source.path is not None:
            check_input_path(source.path, get_settings())
        unreadable = rejected if skip_invalid else None
        structures = read_structures(source.path, source.text, source.format, unreadable)
    accepted: list[NamedStructure] = []
    for structure in structures:
        try:
            validate_structure(structure, params, engine, min_distance)
        except InputError as exc:
            if not skip_invalid:
                raise
            rejected.append((structure, str(exc)))
            continue
        accepted.append(structure)
    if not accepted:
        raise InputError(f"no valid structure to compute ({len(rejected)} rejected)")
    return ValidatedInput(accepted, rejected)
