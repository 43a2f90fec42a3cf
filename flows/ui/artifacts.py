"""Prefect artifacts of a run: results table, markdown summary, and where its files are."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.logging import get_run_logger

from atomforge.flows.models import StructureResult
from atomforge.flows.settings import get_settings

MAX_EMBEDDED_BYTES = 100_000
"""A plot larger than this is named in the plots artifact, not shown in it."""

COLUMNS = (
    ("formula", "formula", None),
    ("status", "status", None),
    ("energy_per_atom_eV", "energy_per_atom_eV", 6),
    ("energy_eV", "energy_eV", 6),
    ("gap_eV", "gap_eV", 4),
    ("max_force_eV_A", "max_force_eV_per_A", 4),
    ("converged", "converged", None),
    ("steps", "n_steps", None),
    ("seconds", "wall_seconds", 2),
)
"""Table columns: (header, result field, decimals for numbers or None)."""


def _cell(result: StructureResult, field: str, digits: int | None) -> object:
    """Return a result's value for a table cell: numbers stay numbers (rounded)."""
    value = getattr(result, field)
    if value is None or digits is None:
        return value.value if hasattr(value, "value") else value
    return round(float(value), digits)


def result_rows(results: list[StructureResult], rank_by: str | None = None) -> list[dict]:
    """Return one table row per result, in the given order: the name, then the column
    the results are ranked by (if any) and the rank, then the key numbers and the
    result's id (``atomforge show`` prints its whole document)."""
    columns = list(COLUMNS)
    if rank_by:
        ranked = next(column for column in columns if column[1] == rank_by)
        columns = [ranked, *(column for column in columns if column != ranked)]
    rows = []
    for position, result in enumerate(results, start=1):
        row: dict[str, object] = {"name": result.name}
        for header, field, digits in columns:
            row[header] = _cell(result, field, digits)
            if rank_by and field == rank_by:
                row["rank"] = position if result.ok else None
        row["result"] = result.ref
        row["message"] = result.message
        rows.append(row)
    return rows


def markdown_summary(title: str, results: list[StructureResult], results_dir: Path) -> str:
    """Return a markdown report of a run: counts, the first structure, failures, and where
    the documents are."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    lines = [f"# {title}", ""]
    lines.append(f"**{len(done)} of {len(results)}** structure(s) completed.")
    if done:
        best = done[0]
        lines += [
            "",
            f"First: **{best.name}** ({best.formula}), E = {best.energy_eV:.6f} eV"
            + (f", gap {best.gap_eV:.3f} eV" if best.gap_eV is not None else "")
            + f", result `{best.ref}`",
            f"Engine: {best.engine} {best.engine_version}",
        ]
    if failed:
        lines += ["", "## Not completed", ""]
        lines += [f"- `{r.name}`: {r.status}: {r.message}" for r in failed[:50]]
    lines += ["", f"Result documents (JSON): `{results_dir}`"]
    return "\n".join(lines)


def files_markdown(flow_run_id: str, results_dir: Path, work_dir: Path, keep: str) -> str:
    """Return where a run's files are, as text to copy, and the commands that read them."""
    return "\n".join(
        [
            "# Where this run's files are",
            "",
            f"- Result documents (one JSON per structure, `run.json`): `{results_dir}`",
            f"- Working directories, the engines' own files (kept: {keep}): `{work_dir}`",
            "",
            "```",
            f"atomforge results --run {flow_run_id}      # this run's results, ranked",
            f"atomforge show {flow_run_id}/<result>       # one whole document",
            f"atomforge show --chain {flow_run_id}/<result>  # and what it started from",
            "```",
        ]
    )


async def publish_files(
    key: str, flow_run_id: str, results_dir: Path, work_dir: Path, keep: str
) -> None:
    """Publish where the run's result documents and working directories are."""
    await acreate_markdown_artifact(
        files_markdown(flow_run_id, results_dir, work_dir, keep),
        key=f"{key}-files",
        description="Where the result documents and working directories are",
    )


async def publish(
    key: str,
    title: str,
    results: list[StructureResult],
    results_dir: Path,
    rank_by: str | None = None,
) -> None:
    """Publish the results table (ranked by the field ``rank_by``, if given; its first
    ``ATOMFORGE_TABLE_ROWS``) and the markdown summary."""
    shown = results[: get_settings().table_rows]
    description = f"{title}: results" + (
        f", the first {len(shown)} of {len(results)}" if len(shown) < len(results) else ""
    )
    await asyncio.gather(
        acreate_table_artifact(
            result_rows(shown, rank_by), key=f"{key}-table", description=description
        ),
        acreate_markdown_artifact(
            markdown_summary(title, results, results_dir),
            key=f"{key}-summary",
            description=f"{title}: summary",
        ),
    )


def plots_markdown(title: str, paths: list[Path]) -> str:
    """Return a markdown report showing each plot (a PNG file of at most
    ``MAX_EMBEDDED_BYTES``, embedded as a data URI: the Prefect UI displays it) above the
    path of its file, to copy."""
    lines = [f"## {title}: plots"]
    for path in paths:
        data = path.read_bytes()
        lines.append("")
        if len(data) <= MAX_EMBEDDED_BYTES:
            encoded = base64.b64encode(data).decode()
            lines += [f"![{path.stem}](data:image/png;base64,{encoded})", ""]
        lines.append(f"`{path}`")
    return "\n".join(lines)


async def publish_plots(key: str, title: str, draw: Callable[[], list[Path]]) -> list[Path]:
    """Unless ``ATOMFORGE_PLOTS`` is false, draw a run's plots with ``draw`` (in a thread)
    and publish them as the ``<key>-plots`` markdown artifact; return the paths drawn.

    A plot that cannot be drawn is logged, not raised: the run's results stand."""
    if not get_settings().plots:
        return []
    try:
        paths = await asyncio.to_thread(draw)
    except Exception:  # the log says; the results are stored either way
        get_run_logger().exception("cannot draw the plots of %s", title)
        return []
    if paths:
        await acreate_markdown_artifact(
            plots_markdown(title, paths), key=f"{key}-plots", description=f"{title}: plots"
        )
    return paths
