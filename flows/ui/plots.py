"""A run's plots as PNG files: a screen's ranking, an optimization's energy at each step, an
MD run's temperature and energies. matplotlib is imported only here, when drawing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from atomforge.engines.parameters import CalculationKind
from atomforge.flows.models import StructureResult
from atomforge.flows.ui.traces import energy_trace

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RANKING_FILE = "ranking.png"
DPI = 100
MAX_LABELS = 40
"""Name the points of a plot of at most this many structures."""
FAILED_STYLE: dict[str, Any] = {"marker": "x", "color": "tab:red", "linestyle": "none"}
LABELS = {
    "energy_per_atom_eV": "energy per atom (eV)",
    "energy_eV": "energy (eV)",
    "gap_eV": "HOMO-LUMO gap (eV)",
}


def _figure(rows: int = 1) -> Figure:
    """Return an empty figure of ``rows`` plots, one above the other."""
    from matplotlib.figure import Figure

    height = 1.2 + 3.0 * rows
    figure = Figure(figsize=(7.0, height), dpi=DPI)
    figure.subplots(rows, 1, sharex=True, squeeze=False)
    figure.subplots_adjust(
        left=0.12, right=0.97, top=1 - 0.5 / height, bottom=0.6 / height, hspace=0.08
    )
    return figure


def _save(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` as PNG; return the path."""
    figure.savefig(path, format="png", dpi=DPI)
    return path


def _label(axes: Axes, xs: list[float], ys: list[float], names: list[str]) -> None:
    """Name each point, if there are few enough to read."""
    if len(names) > MAX_LABELS:
        return
    for x, y, name in zip(xs, ys, names):
        axes.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)


def _mark_failed(axes: Axes, failed: list[StructureResult]) -> None:
    """Say which structures did not complete: a red cross in the legend and their names."""
    if not failed:
        return
    names = ", ".join(r.name for r in failed[:10]) + (" ..." if len(failed) > 10 else "")
    axes.plot([], [], **FAILED_STYLE, label=f"not completed ({len(failed)}): {names}")


def warm_up_drawing() -> None:
    """Draw a throwaway plot like a run's (a symlog axis, whose tick labels are mathtext)
    into memory, so that processes forked from this one find matplotlib's fonts, text
    layout and mathtext parser ready: an optimization plot then takes a forked child
    about 0.1 s instead of 0.35 s. Starts no thread."""
    from io import BytesIO

    figure = _figure()
    axes = figure.axes[0]
    axes.plot(range(8), [0.01 * 0.5**step for step in range(8)], "o-", markersize=3)
    axes.set_yscale("symlog", linthresh=1e-3)
    axes.set(xlabel="step", ylabel=LABELS["energy_eV"])
    axes.set_title("warm-up (H2O): final energy -5.070544 eV")
    axes.legend(["warm-up"], loc="best", fontsize=8)
    figure.savefig(BytesIO(), format="png", dpi=DPI)


def ranking_plots(ranked: list[StructureResult], rank_by: str, folder: Path) -> list[Path]:
    """Draw a screen's ranking into ``folder``/ranking.png; return its path (none
    without results).

    With HOMO-LUMO gaps it plots energy per atom against gap, else the ``rank_by`` value
    against the rank, the best first; structures that did not complete are named in the
    legend (and, ranked, crossed out after the last rank).
    """
    if not ranked:
        return []
    done = [r for r in ranked if r.ok and getattr(r, rank_by) is not None]
    failed = [r for r in ranked if not r.ok]
    figure = _figure()
    axes = figure.axes[0]
    names = [r.name for r in done]
    if any(r.gap_eV is not None for r in done):
        done = [r for r in done if r.gap_eV is not None and r.energy_per_atom_eV is not None]
        names = [r.name for r in done]
        xs = [r.gap_eV for r in done]
        ys = [r.energy_per_atom_eV for r in done]
        axes.scatter(xs, ys, c=range(len(done)), cmap="viridis", label="completed")
        axes.set(xlabel=LABELS["gap_eV"], ylabel=LABELS["energy_per_atom_eV"])
        axes.set_title(f"{len(done)} completed, ranked by {LABELS[rank_by]} (dark: best)")
    else:
        xs = list(range(1, len(done) + 1))
        ys = [getattr(r, rank_by) for r in done]
        axes.plot(xs, ys, "o", label="completed")
        if failed and ys:
            after = range(len(done) + 1, len(done) + len(failed) + 1)
            axes.plot(after, [min(ys)] * len(failed), **FAILED_STYLE)
        axes.set(xlabel="rank", ylabel=LABELS[rank_by])
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.set_title(f"{len(done)} completed, ranked by {LABELS[rank_by]}")
    axes.margins(0.08)
    _label(axes, xs, ys, names)
    _mark_failed(axes, failed)
    axes.legend(loc="best", fontsize=8)
    return [_save(figure, folder / RANKING_FILE)]


def optimization_plot(result: StructureResult, folder: Path) -> Path | None:
    """Draw an optimization's energy at each step into ``folder``/<id>-optimization.png;
    return its path, or None if its folder holds no trace of two steps or more."""
    energies = energy_trace(Path(result.workdir)) if result.workdir else []
    if not energies:
        return None
    figure = _figure()
    axes = figure.axes[0]
    axes.plot(range(len(energies)), [e - energies[-1] for e in energies], "o-", markersize=3)
    axes.set_yscale("symlog", linthresh=1e-3)
    axes.set(xlabel="step", ylabel="energy - final energy (eV)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_title(
        f"{result.name} ({result.formula}), {result.engine} optimize: "
        f"final energy {energies[-1]:.6f} eV"
    )
    return _save(figure, folder / f"{result.id}-optimization.png")


def md_plot(result: StructureResult, folder: Path) -> Path | None:
    """Draw an MD run's temperature and its total and potential energy against time into
    ``folder``/<id>-md.png; return its path, or None without a thermo table."""
    thermo = result.properties.get("thermo") or {}
    times = thermo.get("time_ps") or thermo.get("step")
    if not times or len(times) < 2:
        return None
    figure = _figure(rows=2)
    top, bottom = figure.axes
    top.plot(times, thermo["temperature_K"], color="tab:red")
    top.set(ylabel="temperature (K)")
    top.set_title(f"{result.name} ({result.formula}), {result.engine} md")
    for key, label in (("total_energy_eV", "total"), ("potential_energy_eV", "potential")):
        values = thermo.get(key)
        if values and None not in values:
            bottom.plot(times, values, label=label)
    bottom.set(xlabel="time (ps)" if thermo.get("time_ps") else "step", ylabel="energy (eV)")
    bottom.legend(loc="best", fontsize=8)
    return _save(figure, folder / f"{result.id}-md.png")


def structure_plots(result: StructureResult, folder: Path) -> list[Path]:
    """Draw the plots of one structure's run into ``folder`` (an optimization's energy,
    an MD run's thermo table); return the paths of those drawn."""
    kind = result.parameters.get("kind")
    if not result.ok or kind not in (CalculationKind.optimize, CalculationKind.md):
        return []
    draw = optimization_plot if kind == CalculationKind.optimize else md_plot
    path = draw(result, folder)
    return [path] if path is not None else []
