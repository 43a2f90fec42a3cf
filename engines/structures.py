"""Read structures from files, folders or inline text, and check them before any engine runs.

Every problem becomes an :class:`InputError` with a one-line message that names the
structure, so a screen over hundreds of files says which one is wrong.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.io import read, write
from ase.neighborlist import neighbor_list

from atomforge.engines.errors import InputError

STRUCTURE_SUFFIXES = frozenset({".xyz", ".extxyz", ".cif", ".vasp", ".pdb", ".traj", ".json"})
MIN_DISTANCE = 0.5
MAX_EXTENT = 1000.0
"""Å: a molecule spanning more, or a cell longer, is taken for wrong units or a typo."""


@dataclass
class NamedStructure:
    """A structure, the name it is reported under, and the stored result it came from."""

    name: str
    atoms: Atoms
    parent_id: str | None = None


def to_extxyz(atoms: Atoms) -> str:
    """Return ``atoms`` as extended XYZ text."""
    buffer = io.StringIO()
    write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def safe_name(text: str) -> str:
    """Return ``text`` reduced to characters that are safe in a file name."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return cleaned[:60] or "structure"


def _one_line(exc: BaseException) -> str:
    """Return the first line of an exception's message, without ASE's module prefix and
    without what it quotes (a reader quotes the file's content, which may be a secret)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"(['\"]).*?\1", "(...)", text.replace("ase.io.extxyz: ", ""))
    return text[:160]


def _read_frames(source: io.StringIO | Path, label: str, fmt: str | None) -> list[Atoms]:
    """Return all frames of ``source`` or raise an InputError naming ``label``."""
    try:
        frames = read(source, index=":", format=fmt)
    except KeyError as exc:
        symbol = str(exc.args[0])
        shown = repr(symbol) if re.fullmatch(r"[A-Za-z]{1,3}", symbol) else "(not a symbol)"
        raise InputError(f"{label}: unknown element {shown}") from None
    except UnicodeDecodeError:
        raise InputError(f"{label}: not a text structure file (binary content)") from None
    except Exception as exc:
        raise InputError(f"{label}: cannot read structure: {_one_line(exc)}") from None
    if not frames:
        raise InputError(f"{label}: no structure found")
    return frames if isinstance(frames, list) else [frames]


def _name_frames(stem: str, frames: list[Atoms]) -> list[NamedStructure]:
    """Return the frames named after ``stem`` (or their own ``name`` info when they have one)."""
    if len(frames) == 1:
        return [NamedStructure(safe_name(frames[0].info.get("name", stem)), frames[0])]
    return [
        NamedStructure(safe_name(str(atoms.info.get("name", f"{stem}-{i}"))), atoms)
        for i, atoms in enumerate(frames)
    ]


def read_structure_file(path: Path, fmt: str | None = None) -> list[NamedStructure]:
    """Return every structure in the file ``path``."""
    if not path.is_file():
        raise InputError(f"{path}: no such structure file")
    if path.stat().st_size == 0 or not path.read_bytes().strip():
        raise InputError(f"{path}: structure file is empty")
    if fmt is None and path.suffix in {".xyz", ".extxyz"}:
        fmt = "extxyz"
    return _name_frames(path.stem, _read_frames(path, str(path), fmt))


def read_structure_text(
    text: str, fmt: str = "extxyz", name: str = "inline"
) -> list[NamedStructure]:
    """Return every structure in inline ``text`` (extended XYZ by default)."""
    if not text.strip():
        raise InputError(f"{name}: structure text is empty")
    return _name_frames(name, _read_frames(io.StringIO(text), name, fmt))


def read_structure_folder(
    folder: Path, fmt: str | None = None, unreadable: list[tuple[NamedStructure, str]] | None = None
) -> list[NamedStructure]:
    """Return the structures of every structure file in ``folder``, sorted by file name.

    A file that cannot be read raises InputError, or, given an ``unreadable`` list, is
    added to it (an empty structure named after the file, and why) and skipped.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in STRUCTURE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: no structure files ({', '.join(sorted(STRUCTURE_SUFFIXES))})")
    structures: list[NamedStructure] = []
    for path in files:
        try:
            structures.extend(read_structure_file(path, fmt))
        except InputError as exc:
            if unreadable is None:
                raise
            unreadable.append((NamedStructure(safe_name(path.stem), Atoms()), str(exc)))
    return structures


def read_structures(
    path: str | None,
    text: str | None,
    fmt: str | None,
    unreadable: list[tuple[NamedStructure, str]] | None = None,
) -> list[NamedStructure]:
    """Return the structures named by a path (file or folder) or given as inline text;
    with an ``unreadable`` list, a folder's unreadable files go there instead of raising."""
    if (path is None) == (text is None):
        raise InputError("give exactly one of a structure path or inline structure text")
    if text is not None:
        return read_structure_text(text, fmt or "extxyz")
    source = Path(path).expanduser()
    if source.is_dir():
        return read_structure_folder(source, fmt, unreadable)
    return read_structure_file(source, fmt)


def check_electrons(atoms: Atoms, charge: int, multiplicity: int, label: str) -> None:
    """Raise InputError unless ``charge`` and ``multiplicity`` are possible for ``atoms``."""
    electrons = int(atoms.numbers.sum()) - charge
    unpaired = multiplicity - 1
    if electrons < 0:
        raise InputError(f"{label}: charge {charge:+d} leaves {electrons} electrons")
    if unpaired > electrons or (electrons - unpaired) % 2:
        raise InputError(
            f"{label}: multiplicity {multiplicity} is impossible with {electrons} electrons"
            f" (charge {charge:+d}); use an {'odd' if electrons % 2 == 0 else 'even'} one"
        )


def check_geometry(atoms: Atoms, label: str, min_distance: float = MIN_DISTANCE) -> None:
    """Raise InputError for empty structures, unknown elements, bad numbers or overlapping atoms."""
    if len(atoms) == 0:
        raise InputError(f"{label}: structure has no atoms")
    unknown = [chemical_symbols[z] for z in atoms.numbers if z <= 0 or z > 118]
    if unknown:
        raise InputError(f"{label}: unknown element {unknown[0]!r}")
    if not np.isfinite(atoms.positions).all():
        raise InputError(f"{label}: positions contain NaN or infinite values")
    if atoms.pbc.any() and atoms.cell.rank < int(atoms.pbc.sum()):
        raise InputError(f"{label}: periodic structure has a degenerate cell")
    periodic = bool(atoms.pbc.any())
    extent = atoms.cell.lengths().max() if periodic else np.ptp(atoms.positions, axis=0).max()
    if extent > MAX_EXTENT:
        raise InputError(
            f"{label}: {'its cell is' if periodic else 'spans'} {extent:.4g} A, more than "
            f"{MAX_EXTENT:g} A (coordinates in another unit, or a typo?)"
        )
    if len(atoms) < 2:
        return
    close = _closest_pair(atoms, min_distance)
    if close is not None:
        a, b, d = close
        raise InputError(
            f"{label}: atoms {a} ({atoms[a].symbol}) and {b} ({atoms[b].symbol}) overlap,"
            f" {d:.3f} A apart (minimum {min_distance} A)"
        )


DIRECT_DISTANCES_MAX_ATOMS = 500


def _closest_pair(atoms: Atoms, cutoff: float) -> tuple[int, int, float] | None:
    """Return the closest pair of atoms nearer than ``cutoff`` (indices, distance), or None.

    Molecules of moderate size use all pair distances directly, which is many times faster
    than a neighbour list for them; larger molecules a k-d tree (ASE's neighbour list bins
    their whole bounding box by the cutoff: minutes for 10,000 atoms); periodic structures
    ASE's neighbour list.
    """
    if not atoms.pbc.any() and len(atoms) <= DIRECT_DISTANCES_MAX_ATOMS:
        i, j = np.triu_indices(len(atoms), k=1)
        d = np.linalg.norm(atoms.positions[i] - atoms.positions[j], axis=1)
        mask = d < cutoff
        i, j, d = i[mask], j[mask], d[mask]
    elif not atoms.pbc.any():
        from scipy.spatial import cKDTree

        pairs = cKDTree(atoms.positions).query_pairs(cutoff, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
        d = np.linalg.norm(atoms.positions[i] - atoms.positions[j], axis=1)
    else:
        i, j, d = neighbor_list("ijd", atoms, cutoff, self_interaction=False)
    if not len(d):
        return None
    k = int(np.argmin(d))
    return int(i[k]), int(j[k]), float(d[k])
