"""Molecular dynamics (kind ``md``) for the in-Python ASE engines, run as the lammps engine runs it.

The options are those of the lammps engine's ``md`` kind (:class:`MdOptions`), and so are
the integrators: velocity Verlet for ``nve``, Nosé-Hoover chains for ``nvt`` and, with an
isotropic MTK barostat, ``npt``, damped over 100 and 1000 time steps as in LAMMPS. Initial
velocities are Maxwell-Boltzmann at ``temperature`` from ``seed``, without net momentum
(ASE 3.29's ``thermalize_momenta``).
The results match too: a thermo table every ``thermo_every`` steps (and at the last step)
with the lammps engine's column names and units, and a trajectory frame at each multiple
of ``thermo_every``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase import Atoms, units
from ase.md.md import MolecularDynamics
from ase.md.nose_hoover_chain import IsotropicMTKNPT, NoseHooverChainNVT
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from atomforge.engines.md_options import MdOptions

MD_TRAJECTORY = "trajectory.extxyz"
"""Frames of an MD run (energy, forces, momenta), as the lammps engine writes them."""
Thermo = dict[str, list[float | None]]


def set_initial_velocities(atoms: Atoms, opts: MdOptions) -> None:
    """Give ``atoms`` Maxwell-Boltzmann velocities at ``opts.temperature`` (none: at rest)."""
    if opts.temperature is None:
        return
    rng = np.random.default_rng(opts.seed)
    thermalize_momenta(atoms, opts.temperature, exact_temperature=True, rng=rng)
    Stationary(atoms, preserve_temperature=True)


def make_integrator(atoms: Atoms, opts: MdOptions) -> MolecularDynamics:
    """Return the ASE integrator of ``opts.ensemble`` for ``atoms``."""
    dt = opts.timestep_fs * units.fs
    if opts.ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt, logfile=None)
    if opts.ensemble == "nvt":
        return NoseHooverChainNVT(
            atoms, timestep=dt, temperature_K=opts.temperature, tdamp=100 * dt, logfile=None
        )
    return IsotropicMTKNPT(
        atoms,
        timestep=dt,
        temperature_K=opts.temperature,
        pressure_au=opts.pressure * units.bar,
        tdamp=100 * dt,
        pdamp=1000 * dt,
        logfile=None,
    )


def thermo_row(atoms: Atoms, step: int, timestep_fs: float) -> dict[str, float | None]:
    """Return one thermo line of ``atoms`` at ``step``: the lammps engine's columns and units.

    Pressure (with the kinetic part) and volume are None for a structure that is not
    periodic in all three directions.
    """
    epot = float(atoms.get_potential_energy())
    ekin = float(atoms.get_kinetic_energy())
    periodic = bool(atoms.pbc.all())
    pressure = None
    if periodic:
        stress = atoms.get_stress(include_ideal_gas=True)
        pressure = float(-stress[:3].mean() / units.bar)
    return {
        "step": step,
        "time_ps": step * timestep_fs / 1000,
        "temperature_K": float(atoms.get_temperature()),
        "potential_energy_eV": epot,
        "kinetic_energy_eV": ekin,
        "total_energy_eV": epot + ekin,
        "pressure_bar": pressure,
        "volume_A3": float(atoms.get_volume()) if periodic else None,
    }


def run_md(atoms: Atoms, opts: MdOptions, write_frame: Callable[[], None]) -> Thermo:
    """Run MD on ``atoms`` (which has its calculator) and return the thermo table.

    ``write_frame`` is called every ``thermo_every`` steps, step 0 included.
    """
    set_initial_velocities(atoms, opts)
    integrator = make_integrator(atoms, opts)
    rows: list[dict[str, float | None]] = []

    def record() -> None:
        rows.append(thermo_row(atoms, integrator.nsteps, opts.timestep_fs))
        write_frame()

    integrator.attach(record, interval=opts.thermo_every)
    integrator.run(opts.steps)
    if rows[-1]["step"] != integrator.nsteps:
        rows.append(thermo_row(atoms, integrator.nsteps, opts.timestep_fs))
    return {key: [row[key] for row in rows] for key in rows[0]}
