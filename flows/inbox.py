"""The ``screen-inbox`` flow: screen the files dropped into an inbox folder, each once.

The inbox is a job queue on the file system (:mod:`atomforge.flows.store.inbox`): a run
gives back the files of dead runs, claims what waits, screens it like ``screen`` does,
and moves each file to done/ or failed/ with a ``<file>.result.json`` naming its results.
Runs that share an inbox (two workers, two schedules) never compute a file twice. An
empty inbox makes a run that ends at once, Completed, without computing anything.

``async`` for the reason given in :mod:`atomforge.flows.simulate`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed, State
from pydantic import BaseModel, Field

from atomforge.engines import get_engine
from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.status import Status
from atomforge.engines.structures import STRUCTURE_SUFFIXES, read_structure_file
from atomforge.flows.models import (
    DEFAULT_OPTIONS,
    DEFAULT_PARAMETERS,
    RunOptions,
    SimulationParameters,
    StructureResult,
    StructureSource,
)
from atomforge.flows.pipeline import run_structures
from atomforge.flows.ranking import RANK_FIELDS
from atomforge.flows.scheduling.dask_runner import simulation_flow_options
from atomforge.flows.screen import RankedStructure, RankKey, ScreenReport, rank
from atomforge.flows.settings import get_settings
from atomforge.flows.store.inbox import (
    Claim,
    FileOutcome,
    Inbox,
    InboxResult,
    claim,
    finish,
    recover,
    release,
)
from atomforge.flows.validation import validate_structure


class InboxReport(BaseModel):
    """What a screen-inbox run did: each file it took and where it went, and the ranking."""

    inbox: str
    flow_run_id: str
    message: str
    recovered: list[str] = Field(
        default_factory=list, description="Files of dead runs given back to the inbox first."
    )
    files: list[FileOutcome] = Field(default_factory=list)
    screen: ScreenReport | None = None


@dataclass
class _Plan:
    """A claim sorted out before the run: files to screen, and files failed at once."""

    to_screen: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    owners: dict[tuple[str, bool], deque[Path]] = field(default_factory=lambda: defaultdict(deque))
    """Which file each structure came from, by (name, valid), in the order of the run."""


def _plan(files: list[Path], params: CalculationParameters) -> _Plan:
    """Return which claimed files to screen and which fail before any engine runs.

    A file fails at once when it is not a structure file, cannot be read, or holds no
    structure that validate would accept; the others go to the run, whose own validation
    (``skip_invalid``) reports their invalid structures. The run numbers its structures as
    the files read them, valid ones first, so a structure's file is the next one in line
    for its name and validity.
    """
    plan = _Plan()
    engine = get_engine(params.engine)
    min_distance = get_settings().min_distance
    for path in files:
        if path.suffix not in STRUCTURE_SUFFIXES:
            plan.failed[path] = f"not a structure file ({', '.join(sorted(STRUCTURE_SUFFIXES))})"
            continue
        try:
            structures = read_structure_file(path)
        except InputError as exc:
            plan.failed[path] = str(exc).replace(f"{path}: ", "", 1)
            continue
        valid: list[bool] = []
        reasons: list[str] = []
        for structure in structures:
            try:
                validate_structure(structure, params, engine, min_distance)
                valid.append(True)
            except InputError as exc:
                valid.append(False)
                reasons.append(str(exc))
        if not any(valid):
            plan.failed[path] = "; ".join(reasons)
            continue
        plan.to_screen.append(path)
        for structure, ok in zip(structures, valid):
            plan.owners[(structure.name, ok)].append(path)
    return plan


def _results_by_file(
    results: list[StructureResult], plan: _Plan
) -> dict[Path, list[StructureResult]]:
    """Return each screened file's results, found by structure name (in run order)."""
    by_file: dict[Path, list[StructureResult]] = {path: [] for path in plan.to_screen}
    for result in sorted(results, key=lambda r: r.index):
        valid = result.status is not Status.invalid
        line = plan.owners[(result.name, valid)] or plan.owners[(result.name, not valid)]
        if line:
            by_file[line.popleft()].append(result)
    return by_file


def _outcome(path: Path, results: list[StructureResult], flow_run_id: str) -> FileOutcome:
    """Return the outcome of a screened file: done if every structure of it completed."""
    bad = [r for r in results if not r.ok]
    if not results:
        message = "no result: the run did not report this file's structures"
    elif bad:
        message = "; ".join(
            f"{r.name}: {r.status.value}: {r.message.removeprefix(f'{r.name}: ')}" for r in bad
        )
    else:
        message = f"{len(results)} structure(s) completed"
    return FileOutcome(
        file=path.name,
        path=str(path),
        status="done" if results and not bad else "failed",
        message=message,
        flow_run_id=flow_run_id,
        results=[
            InboxResult(
                id=f"{r.flow_run_id}/{r.id}", name=r.name, status=r.status.value, message=r.message
            )
            for r in results
        ],
    )


async def _screen_claim(
    held: Claim,
    parameters: SimulationParameters,
    options: RunOptions,
    rank_by: RankKey,
    flow_run_id: str,
) -> tuple[list[FileOutcome], ScreenReport | None, str | None]:
    """Screen the files of a claim and move each to done/ or failed/; return the outcomes,
    the ranking (None if no file had a structure to compute), and why the screen failed
    (more of its computed structures failed than the run tolerates), or None."""
    params = parameters.resolve()
    plan = await asyncio.to_thread(_plan, held.files, params)
    outcomes = [
        FileOutcome(
            file=path.name, path=str(path), status="failed", message=reason, flow_run_id=flow_run_id
        )
        for path, reason in plan.failed.items()
    ]
    for path, failed in zip(plan.failed, outcomes):
        finish(held, path, failed)
    if not plan.to_screen:
        return outcomes, None, None
    title = (
        f"screen-inbox: {len(plan.to_screen)} file(s), {parameters.engine} "
        f"{parameters.kind.value}, ranked by {rank_by}"
    )
    source = StructureSource(path=str(held.folder))
    screened = options.model_copy(update={"skip_invalid": True})
    outcome = await run_structures(source, params, screened, title)
    ranked = rank(outcome.results, rank_by)
    await outcome.publish("screen-inbox", title, ranked, RANK_FIELDS[rank_by])
    for path, results in _results_by_file(outcome.results, plan).items():
        file_outcome = _outcome(path, results, flow_run_id)
        finish(held, path, file_outcome)
        outcomes.append(file_outcome)
    report = ScreenReport(
        flow_run_id=flow_run_id,
        rank_by=rank_by,
        n_structures=len(ranked),
        n_completed=sum(r.ok for r in ranked),
        results=[RankedStructure.of(result) for result in ranked],
    )
    return outcomes, report, None if outcome.ok else outcome.message


@flow(name="screen-inbox", **simulation_flow_options())
async def inbox_screen(
    inbox: str | None = None,
    parameters: SimulationParameters = DEFAULT_PARAMETERS,
    options: RunOptions = DEFAULT_OPTIONS,
    rank_by: RankKey = "energy_per_atom",
) -> State[InboxReport]:
    """Screen every file waiting in the inbox; return a state whose message says what
    became of the files and whose result is an :class:`InboxReport`: Completed, or Failed
    when more of the computed structures failed than ``options.max_failed_fraction``
    (default ``ATOMFORGE_MAX_FAILED_FRACTION``) allows, as for screen. Files that could
    not be read or held no valid structure go to failed/ and do not count.

    Files of runs that died are given back to the inbox first; each file ends in done/ or
    failed/ with its sidecar. If the run itself fails, its files go back to the inbox.

    Args:
        inbox: The inbox folder; default ATOMFORGE_INBOX_DIR, else <ATOMFORGE_HOME>/inbox.
            It and its processing/, done/ and failed/ are created when a run needs them.
        parameters: Engine and calculation, as for screen.
        options: As for screen; invalid structures are always reported, not fatal.
        rank_by: The order of the ranking.
    """
    queue = Inbox(
        Path(inbox).expanduser().resolve() if inbox else get_settings().resolved_inbox_dir()
    )
    flow_run_id = str(FlowRunContext.get().flow_run.id)
    logger = get_run_logger()
    recovered = await asyncio.to_thread(recover, queue)
    if recovered:
        logger.warning("gave %d file(s) of dead runs back to %s", len(recovered), queue.root)
    held = await asyncio.to_thread(claim, queue, flow_run_id)
    report = InboxReport(
        inbox=str(queue.root),
        flow_run_id=flow_run_id,
        message="",
        recovered=[path.name for path in recovered],
    )
    if not held.files:
        report.message = f"no files waiting in {queue.root}"
        return Completed(message=report.message, data=report)
    logger.info("claimed %d file(s) from %s", len(held.files), queue.root)
    try:
        report.files, report.screen, failure = await _screen_claim(
            held, parameters, options, rank_by, flow_run_id
        )
    except BaseException:
        returned = release(held)
        logger.warning("run failed: gave %d file(s) back to %s", len(returned), queue.root)
        raise
    release(held)
    n_done = sum(outcome.status == "done" for outcome in report.files)
    report.message = (
        f"{len(report.files)} file(s) from {queue.root}: {n_done} done, "
        f"{len(report.files) - n_done} failed"
    )
    if failure:
        report.message += f"; {failure}"
        return Failed(message=report.message, data=report)
    return Completed(message=report.message, data=report)
