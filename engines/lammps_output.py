"""What the lammps engine reads: thermo tables, minimization stats, errors, version, dumps.

The log functions take the text of ``log.lammps`` (or the screen output) and return plain
Python values, so they are tested on real output files without running LAMMPS. The dump
readers rotate LAMMPS' lower-triangular box back to the structure's own orientation.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.lammps import Prism, convert
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.lammpsrun import read_lammps_dump_text

Thermo = dict[str, list[float]]
"""One thermo table: a column of numbers per LAMMPS keyword (``Step``, ``PotEng``, ...)."""

_STOPPING = re.compile(r"Stopping criterion = (.+)")
_ITERATIONS = re.compile(r"Iterations, force evaluations = (\d+)")
_VERSION = re.compile(r"LAMMPS \((.+)\)|Simulator - (.+)")
CONVERGED_CRITERIA = frozenset({"energy tolerance", "force tolerance"})
"""Stopping criteria that mean a minimization reached the tolerances it was given."""


def read_thermo(text: str) -> list[Thermo]:
    """Return every thermo table in ``text``, in order (one per run or minimize)."""
    tables: list[Thermo] = []
    header: list[str] | None = None
    for line in text.splitlines():
        fields = line.split()
        if fields[:1] == ["Step"]:
            header = fields
            tables.append({name: [] for name in header})
        elif header is not None and len(fields) == len(header) and _numbers(fields):
            for name, value in zip(header, fields, strict=True):
                tables[-1][name].append(float(value))
        elif header is not None and line.startswith("Loop time"):
            header = None
    return tables


def _numbers(fields: list[str]) -> bool:
    """Return True when every field is a number."""
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return True


def stopping_criterion(text: str) -> str | None:
    """Return why the last minimization stopped (e.g. ``force tolerance``), or None."""
    found = _STOPPING.findall(text)
    return found[-1].strip() if found else None


def minimize_iterations(text: str) -> int | None:
    """Return the iterations of the last minimization, or None if there was none."""
    found = _ITERATIONS.findall(text)
    return int(found[-1]) if found else None


def error_lines(text: str) -> list[str]:
    """Return the ``ERROR`` lines and the lost-atoms messages LAMMPS printed."""
    return [
        line.strip()
        for line in text.splitlines()
        if line.startswith("ERROR") or "Lost atoms" in line
    ]


def lammps_version(text: str) -> str | None:
    """Return the version in a log header or ``lmp -h`` output, e.g. ``29 Sep 2021 - Update 2``."""
    match = _VERSION.search(text)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).strip()


def read_dump(path: Path, structure: Atoms, species: list[str]) -> list[Atoms]:
    """Return the frames of a dump in the orientation of ``structure``, with their forces."""
    with path.open() as fd:
        frames = read_lammps_dump_text(fd, index=":", specorder=species)
    return [to_ase_frame(frame, structure) for frame in frames]


def to_ase_frame(frame: Atoms, structure: Atoms) -> Atoms:
    """Return a dump frame rotated back from LAMMPS' box to the cell of ``structure``.

    ASE's dump reader wraps forces too when given a reduced :class:`Prism`, so the
    rotation is done here: positions wrapped into the cell, vectors only rotated.
    """
    prism = Prism(structure.cell.array, structure.pbc, reduce_cell=True)
    cell = prism.update_cell(frame.cell.array)
    positions = prism.vector_to_ase(frame.positions, wrap=True)
    atoms = Atoms(frame.symbols, positions=positions, cell=cell, pbc=structure.pbc)
    if frame.has("momenta"):
        atoms.set_velocities(frame.get_velocities() @ prism.rot_mat.T)
    forces = frame.get_forces() @ prism.rot_mat.T
    atoms.calc = SinglePointCalculator(atoms, forces=forces)
    return atoms


def stress_of(row: dict[str, float], structure: Atoms) -> np.ndarray:
    """Return the Voigt stress (eV/Å³, ASE's sign) from a thermo row's pressure tensor."""
    names = ("Pxx", "Pxy", "Pxz", "Pxy", "Pyy", "Pyz", "Pxz", "Pyz", "Pzz")
    pressure = np.array([row[n] for n in names]).reshape(3, 3)
    prism = Prism(structure.cell.array, structure.pbc, reduce_cell=True)
    stress = -convert(prism.tensor2_to_ase(pressure), "pressure", "metal", "ASE")
    return stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def add_energies(frames: list[Atoms], table: Thermo, every: int) -> None:
    """Give each MD frame (dumped every ``every`` steps) its energy from the thermo table."""
    energies = dict(zip(table["Step"], table["PotEng"], strict=True))
    for i, frame in enumerate(frames):
        forces = frame.get_forces()
        frame.calc = SinglePointCalculator(frame, energy=energies[i * every], forces=forces)
