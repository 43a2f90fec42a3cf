"""An optimization's energy at each step, read from the files its engine left in its folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ase.io import read
from ase.units import Hartree

from atomforge.engines.ase_runner import TRAJECTORY_FILE
from atomforge.engines.espresso import OUTPUT_FILE as ESPRESSO_OUTPUT
from atomforge.engines.lammps_output import read_thermo


def _xtb_log(path: Path) -> list[float]:
    """Return the energies (eV) of xtb's optimization log (one xyz frame per step, its
    comment line ``energy: <Eh> gnorm: ...``)."""
    energies = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields[:1] == ["energy:"]:
            energies.append(float(fields[1]) * Hartree)
    return energies


def _frames(format: str) -> Callable[[Path], list[float]]:
    """Return a reader of the energy of every frame of a file in ASE ``format``."""

    def energies(path: Path) -> list[float]:
        frames = read(path, index=":", format=format)
        return [float(f.get_potential_energy()) for f in frames if f.calc is not None]

    return energies


def _lammps_log(path: Path) -> list[float]:
    """Return the potential energies (eV) of the last thermo table of ``log.lammps``."""
    tables = read_thermo(path.read_text())
    return list(tables[-1].get("PotEng", [])) if tables else []


TRACE_FILES: tuple[tuple[str, Callable[[Path], list[float]]], ...] = (
    ("xtbopt.log", _xtb_log),
    (TRAJECTORY_FILE, _frames("extxyz")),
    (ESPRESSO_OUTPUT, _frames("espresso-out")),
    ("vasprun.xml", _frames("vasp-xml")),
    ("log.lammps", _lammps_log),
)
"""Files that hold an optimization's steps, each with its reader, in the order tried."""


def energy_trace(workdir: Path) -> list[float]:
    """Return the energy (eV) at each optimization step found in ``workdir``, first
    step first; empty if no file there holds two steps or more."""
    for name, reader in TRACE_FILES:
        path = workdir / name
        if not path.is_file():
            continue
        try:
            energies = reader(path)
        except (OSError, ValueError, KeyError, IndexError):
            continue
        if len(energies) >= 2:
            return energies
    return []
