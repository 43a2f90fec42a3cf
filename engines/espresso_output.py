"""Reading pw.x's output (``espresso.pwo``): its version, its last run, its problems.

The run loop appends each rerun's output to the same file, so everything here looks at
the last pw.x run in it. ASE's ``read_espresso_out`` reads the structures, energies,
forces and stress; the rest (gap, moments, SCF accuracy, steps) is read from the text.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read

from atomforge.engines.base import Problem

OUTPUT_FILE = "espresso.pwo"
GAP_LINE = r"highest occupied, lowest unoccupied level \(ev\):\s*(\S+)\s+(\S+)"


@cache
def pw_version(command: str) -> str:
    """Return the version pw.x prints on start, e.g. ``6.7MaX``.

    pw.x is started without input in a scratch folder: it prints its banner, then fails
    and leaves CRASH and input_tmp.in files there.
    """
    try:
        with tempfile.TemporaryDirectory() as scratch:
            out = subprocess.run(
                [command],
                input="",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                cwd=scratch,
            ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"Program PWSCF\s*v\.(\S+)", out)
    return match.group(1) if match else "unknown"


def last_run(text: str) -> str:
    """Return the output of the last pw.x run in ``text`` (the run loop appends reruns)."""
    return text[text.rfind("Program PWSCF") :]


def last_float(pattern: str, text: str) -> float | None:
    """Return the number of the last match of ``pattern`` in ``text``, or None."""
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def site_moments(run: str, n_atoms: int) -> np.ndarray | None:
    """Return the last per-site moments (μB) of ``run``, or None without spin.

    pw.x 6.7 prints ``atom: 1 charge: 6.48 magn: 1.95 constr: 0.00``; ASE takes the last
    column, which is the constraint, so the ``magn`` column is read here.
    """
    block = run.rpartition("Magnetic moment per site")[2]
    moments = re.findall(r"magn:\s*(\S+)", block)[:n_atoms]
    return np.array(moments, dtype=float) if len(moments) == n_atoms else None


def scf_problem(run: str) -> Problem | None:
    """Return ``scf_not_converged`` if the last SCF of ``run`` stopped short of conv_thr."""
    if "convergence NOT achieved" in run:
        steps = re.findall(r"convergence NOT achieved after\s+(\d+)", run)
        return Problem("scf_not_converged", f"pw.x: SCF not converged in {steps[-1]} iterations")
    accuracy = last_float(r"estimated scf accuracy\s*<\s*(\S+) Ry", run)
    threshold = last_float(r"convergence threshold\s*=\s*(\S+)", run)
    if accuracy is not None and threshold is not None and accuracy > threshold:
        return Problem(
            "scf_not_converged",
            f"pw.x: SCF not converged (accuracy {accuracy:.2e} Ry > conv_thr {threshold:.0e})",
        )
    return None


def output_problem(run: str, max_steps: int) -> Problem | None:
    """Return what went wrong in ``run``: a pw.x error, an unconverged SCF, or an
    optimization out of its ``max_steps``; None if nothing did."""
    error = re.search(r"Error in routine\s+(\S+ \(\d+\)):\s*\n\s*(.*)", run)
    if error:
        return Problem("pw_error", f"pw.x: error in {error[1]}: {error[2].strip()}")
    scf = scf_problem(run)
    if scf is not None:
        return scf
    if "The maximum number of steps has been reached." in run:
        return Problem(
            "optimization_not_converged", f"pw.x: optimization not converged in {max_steps} steps"
        )
    return None


def read_last(path: Path) -> tuple[Atoms, str]:
    """Return the last computed structure of the output at ``path`` (ASE's reader, with its
    results) and the text of its last run. Raises ValueError for an unconverged SCF or an
    output ASE cannot read."""
    run = last_run(path.read_text(errors="replace"))
    problem = scf_problem(run)
    if problem is not None:
        raise ValueError(problem.message)
    try:
        atoms = read(path, format="espresso-out", index=-1)
    except (AssertionError, IndexError) as exc:
        raise ValueError(f"pw.x output unreadable: {exc!r}") from None
    return atoms, run


def last_printed_geometry(path: Path) -> Atoms | None:
    """Return the last geometry (and cell) the output at ``path`` printed, computed or not,
    or None: where a restart of an optimization goes on from."""
    try:
        atoms = read(path, format="espresso-out", index=-1, results_required=False)
    except (OSError, ValueError, AssertionError, IndexError):
        return None
    atoms.calc = None
    return atoms


def bfgs_steps(run: str) -> int:
    """Return the number of BFGS steps ``run`` reports (0 if none)."""
    steps = [int(n) for n in re.findall(r"(\d+) bfgs steps", run)]
    steps += [int(n) for n in re.findall(r"number of bfgs steps\s*=\s*(\d+)", run)]
    return max(steps, default=0)


def band_gap(run: str) -> float | None:
    """Return the gap (eV) between the highest occupied and lowest unoccupied levels pw.x
    printed last, or None where the occupations give none."""
    edges = re.findall(GAP_LINE, run)
    return float(edges[-1][1]) - float(edges[-1][0]) if edges else None
