"""Prefect artifacts of a run: results table, markdown summary and file links."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect.artifacts import (
    acreate_link_artifact,
    acreate_markdown_artifact,
    acreate_table_artifact,
)

from atomforge.flows.models import StructureResult


def _fmt(value: float | None, digits: int) -> str:
    """Return ``value`` rounded for display, or an empty string."""
    return "" if value is None else f"{value:.{digits}f}"


def result_rows(results: list[StructureResult]) -> list[dict[str, object]]:
    """Return one table row per result, in the given order."""
    return [
        {
            "rank": rank,
            "name": r.name,
            "formula": r.formula,
            "status": r.status,
            "energy_eV": _fmt(r.energy_eV, 6),
            "energy_Eh": _fmt(r.energy_hartree, 8),
            "energy_per_atom_eV": _fmt(r.energy_per_atom_eV, 6),
            "gap_eV": _fmt(r.gap_eV, 4),
            "max_force_eV_A": _fmt(r.max_force_eV_per_A, 4),
            "converged": "" if r.converged is None else str(r.converged),
            "steps": "" if r.n_steps is None else r.n_steps,
            "seconds": _fmt(r.wall_seconds, 2),
            "message": r.message,
        }
        for rank, r in enumerate(results, start=1)
    ]


def markdown_summary(title: str, results: list[StructureResult], results_dir: Path) -> str:
    """Return a markdown report of a run: counts, the best structure, and where files are."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    lines = [f"# {title}", ""]
    lines.append(f"**{len(done)} of {len(results)}** structure(s) completed.")
    if done:
        best = done[0]
        lines += [
            "",
            f"First: **{best.name}** ({best.formula}), E = {best.energy_eV:.6f} eV"
            + (f", gap {best.gap_eV:.3f} eV" if best.gap_eV is not None else ""),
            f"Engine: {best.engine} {best.engine_version}",
        ]
    if failed:
        lines += ["", "## Not completed", ""]
        lines += [f"- `{r.name}`: {r.status}: {r.message}" for r in failed[:50]]
    lines += ["", f"Result documents (JSON): `{results_dir}`"]
    return "\n".join(lines)


async def link_files(key: str, results_dir: Path, work_dir: Path, keep: str) -> None:
    """Create links to the run's result documents and working directories."""
    await asyncio.gather(
        acreate_link_artifact(
            results_dir.as_uri(), link_text="result documents (JSON)", key=f"{key}-results"
        ),
        acreate_link_artifact(
            work_dir.as_uri(), link_text=f"working directories (kept: {keep})", key=f"{key}-files"
        ),
    )


async def publish(key: str, title: str, results: list[StructureResult], results_dir: Path) -> None:
    """Publish the results table and the markdown summary."""
    await asyncio.gather(
        acreate_table_artifact(result_rows(results), key=f"{key}-table", description=title),
        acreate_markdown_artifact(
            markdown_summary(title, results, results_dir), key=f"{key}-summary", description=title
        ),
    )
