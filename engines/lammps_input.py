"""What the lammps engine writes: its options, the potential's pair commands, the script.

Potential files name their pair_style by extension and their elements in their header
(EAM funcfl: one atomic number on line 2; setfl ``eam/alloy`` and ``eam/fs``: line 4) or
entries (``sw``, ``tersoff``: element triplets), so a structure a potential does not cover
is refused before LAMMPS starts.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from ase.data import atomic_numbers, chemical_symbols
from pydantic import Field

from atomforge.engines.errors import InputError
from atomforge.engines.md_options import MdOptions
from atomforge.engines.parameters import CalculationKind, CalculationParameters

SCRIPT, DATA, LOG = "in.lmp", "data.lmp", "log.lammps"
FINAL_DUMP, TRAJ_DUMP = "final.dump", "traj.dump"
STYLES = {
    ".eam.alloy": "eam/alloy",
    ".eam.fs": "eam/fs",
    ".eam": "eam",
    ".sw": "sw",
    ".tersoff": "tersoff",
}
THERMO = "step time temp pe ke etotal press vol pxx pyy pzz pyz pxz pxy"
DUMP_COLUMNS = "id type x y z vx vy vz fx fy fz"
FLOAT_FORMAT = "format float %.15g"


class LammpsOptions(MdOptions):
    """Options of LAMMPS: the potential, and the integrator for kind ``md``."""

    potential: str | None = Field(
        None,
        description="Potential file: a name in ATOMFORGE_LAMMPS_POTENTIAL_DIR (e.g. Cu_u3.eam) "
        "or an absolute path; pair_style from its extension: .eam, .eam.alloy, .eam.fs, .sw, "
        ".tersoff.",
    )
    pair_style: str | None = Field(
        None, description="A pair_style line instead of potential, e.g. 'lj/cut 8.0'."
    )
    pair_coeff: list[str] = Field(
        default_factory=list,
        description="pair_coeff lines for pair_style, without the command, e.g. ['* * 0.01 3.4'].",
    )
    elements: list[str] | None = Field(
        None,
        description="Elements in the order of LAMMPS atom types; default: the structure's "
        "elements in alphabetical order.",
    )
    min_style: Literal["cg", "sd", "hftn", "fire"] = Field(
        "cg", description="LAMMPS minimizer (kind optimize); fire cannot relax the cell."
    )
    cell_relax: Literal["iso", "aniso", "tri"] = Field(
        "iso", description="How fix box/relax changes the cell with relax_cell (to 0 pressure)."
    )

    def problem(self, kind: CalculationKind) -> str | None:
        """Return what is missing or contradictory for a calculation of ``kind``, or None."""
        if (self.potential is None) == (self.pair_style is None):
            return "give either options.potential or options.pair_style (with pair_coeff)"
        if self.pair_style is not None and not self.pair_coeff:
            return "pair_style needs pair_coeff lines"
        if self.potential is not None and self.pair_coeff:
            return "pair_coeff goes with pair_style, not with potential"
        return self.md_problem() if kind is CalculationKind.md else None


def pair_style_of(path: Path) -> str:
    """Return the pair_style a potential file is for, from its extension."""
    for suffix, style in STYLES.items():
        if path.name.endswith(suffix):
            return style
    raise InputError(f"lammps: cannot tell the pair_style of {path.name} (use pair_style)")


@cache
def potential_elements(path: Path) -> frozenset[str]:
    """Return the elements a potential file covers, read from its header or entries."""
    lines = path.read_text(errors="replace").splitlines()
    style = pair_style_of(path)
    if style == "eam":
        return frozenset({chemical_symbols[int(lines[1].split()[0])]})
    if style in ("eam/alloy", "eam/fs"):
        return frozenset(lines[3].split()[1:])
    firsts = (line.split()[:1] for line in lines if not line.lstrip().startswith("#"))
    return frozenset(f[0] for f in firsts if f and f[0] in atomic_numbers)


def pair_lines(options: LammpsOptions, path: Path | None, species: list[str]) -> list[str]:
    """Return the pair_style and pair_coeff commands of ``options``."""
    if path is None:
        return [f"pair_style {options.pair_style}"] + [
            f"pair_coeff {c}" for c in options.pair_coeff
        ]
    style = pair_style_of(path)
    if style == "eam":
        return ["pair_style eam"] + [
            f"pair_coeff {t} {t} {path}" for t in range(1, len(species) + 1)
        ]
    return [f"pair_style {style}", f"pair_coeff * * {path} {' '.join(species)}"]


def run_lines(params: CalculationParameters) -> list[str]:
    """Return the commands that compute kind singlepoint, optimize or md."""
    if params.kind is CalculationKind.singlepoint:
        return ["run 0"]
    if params.kind is CalculationKind.optimize:
        return _minimize_lines(params)
    return _md_lines(params.options)


def _minimize_lines(params: CalculationParameters) -> list[str]:
    """Return the commands of a minimization to ``fmax`` (max force, as ASE's fmax)."""
    opts: LammpsOptions = params.options
    lines = [f"min_style {opts.min_style}", "min_modify norm max"]
    if params.relax_cell:
        lines.append(f"fix relax all box/relax {opts.cell_relax} 0.0")
    return [*lines, f"minimize 0.0 {params.fmax} {params.max_steps} {10 * params.max_steps}"]


def _md_lines(opts: LammpsOptions) -> list[str]:
    """Return the commands of an MD run, dumping a frame every ``thermo_every`` steps."""
    dt = opts.timestep_fs / 1000
    lines = [
        f"timestep {dt}",
        f"dump traj all custom {opts.thermo_every} {TRAJ_DUMP} {DUMP_COLUMNS}",
        f"dump_modify traj sort id {FLOAT_FORMAT}",
    ]
    if opts.temperature is not None:
        lines.append(f"velocity all create {opts.temperature} {opts.seed} mom yes dist gaussian")
    thermostat = f"temp {opts.temperature} {opts.temperature} {100 * dt}"
    barostat = f"iso {opts.pressure} {opts.pressure} {1000 * dt}"
    fix = {"nve": "nve", "nvt": f"nvt {thermostat}", "npt": f"npt {thermostat} {barostat}"}
    return [*lines, f"fix md all {fix[opts.ensemble]}", f"run {opts.steps}"]


def input_script(params: CalculationParameters, pair: list[str]) -> str:
    """Return the LAMMPS input script computing ``params.kind`` with the ``pair`` commands."""
    opts: LammpsOptions = params.options
    lines = ["units metal", "atom_style atomic", "boundary p p p", f"read_data {DATA}", *pair]
    lines += [f"thermo_style custom {THERMO}", f"thermo_modify {FLOAT_FORMAT}"]
    lines += [f"thermo {opts.thermo_every}", *run_lines(params)]
    lines.append(
        f"write_dump all custom {FINAL_DUMP} id type x y z fx fy fz modify sort id {FLOAT_FORMAT}"
    )
    return "\n".join(lines) + "\n"
