"""Result documents: a structure's inputs, how its run ended, and what the engine computed."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from ase.units import GPa, Hartree

from atomforge.engines import get_engine
from atomforge.engines.base import Engine, EngineResults
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.status import JobStatus, Status
from atomforge.engines.structures import read_structure_text, to_extxyz
from atomforge.flows.jobs import Job, RunContext
from atomforge.flows.paths import RunPaths
from atomforge.flows.scheduling.claims import CLAIM_FILE
from atomforge.flows.store.files import load_plan, load_result, save_result
from atomforge.flows.store.records import StructureResult

NOT_STARTED = "the run ended before this structure started"
STOPPED = "the run ended while this structure was running"


def make_result(
    job: Job,
    params: CalculationParameters,
    run: RunContext,
    status: JobStatus,
    engine: Engine | None = None,
) -> StructureResult:
    """Return the result document of ``job`` with its inputs and how it ended (no outputs)."""
    engine = engine or get_engine(params.engine)
    return StructureResult(
        id=f"{job.index:05d}-{job.name}",
        flow_run_id=run.flow_run_id,
        flow_name=run.flow_name,
        index=job.index,
        name=job.name,
        status=status.status,
        message=status.message,
        corrections=status.corrections,
        engine=engine.name,
        engine_version=engine.version(),
        parameters=params.model_dump(mode="json"),
        formula=job.atoms.get_chemical_formula(mode="hill"),
        n_atoms=len(job.atoms),
        input_structure=job.input_extxyz,
        wall_seconds=status.wall_seconds,
        host=status.host,
        batch_job=status.batch_job,
        workdir=str(job.directory),
        input_key=job.input_key,
        parent_id=job.parent_id,
        workflow_run_id=run.workflow_run_id,
        step=run.step,
    )


def reused_result(job: Job, run: RunContext, stored: StructureResult) -> StructureResult:
    """Return (and store) the document of ``job`` made from ``stored``, a completed result
    with the same input key: its outputs, this run's identity, and where it came from."""
    result = stored.model_copy(
        update={
            "id": f"{job.index:05d}-{job.name}",
            "flow_run_id": run.flow_run_id,
            "flow_name": run.flow_name,
            "index": job.index,
            "name": job.name,
            "input_structure": job.input_extxyz,
            "wall_seconds": 0.0,
            "reused_from": stored.ref,
            "parent_id": job.parent_id,
            "workflow_run_id": run.workflow_run_id,
            "step": run.step,
            "created_at": datetime.now(timezone.utc),
        }
    )
    save_result(run.results_root, result)
    return result


def fill_outputs(result: StructureResult, out: EngineResults) -> None:
    """Copy what the engine computed into ``result``, in the document's units."""
    result.energy_eV = out.energy
    result.energy_hartree = out.energy / Hartree
    result.energy_per_atom_eV = out.energy / len(out.atoms)
    result.gap_eV = out.gap
    result.fermi_level_eV = out.fermi_level
    result.converged = out.converged
    result.n_steps = out.n_steps
    result.final_structure = to_extxyz(out.atoms)
    if out.forces is not None:
        result.forces_eV_per_A = np.asarray(out.forces).tolist()
        result.max_force_eV_per_A = float(np.linalg.norm(out.forces, axis=1).max())
    if out.stress is not None:
        stress = np.asarray(out.stress, dtype=float).reshape(-1)
        result.stress_eV_per_A3 = stress.tolist()
        result.pressure_GPa = float(-stress[:3].mean() / GPa)
    if out.magmoms is not None:
        result.magnetic_moments = np.asarray(out.magmoms, dtype=float).tolist()
    result.magnetic_moment = out.magmom
    result.properties = out.properties
    if out.version:
        result.engine_version = out.version


def _not_finite(out: EngineResults) -> str | None:
    """Return what is not a finite number in ``out`` (an energy or forces of NaN), or None."""
    if not np.isfinite(out.energy):
        return f"a non-finite energy ({out.energy})"
    if out.forces is not None and not np.isfinite(np.asarray(out.forces, dtype=float)).all():
        return "non-finite forces"
    return None


def parse_job(
    job: Job, status: JobStatus, params: CalculationParameters, run: RunContext, engine: Engine
) -> StructureResult:
    """Return and store the result document of ``job``, with the engine's outputs if it finished."""
    result = make_result(job, params, run, status, engine)
    if status.completed:
        try:
            out = engine.read_results(job.directory, params)
        except (OSError, ValueError, KeyError) as exc:
            result.status = Status.failed
            result.message = f"cannot read results: {exc}"
        else:
            if problem := _not_finite(out):
                result.status = Status.failed
                result.message = f"{engine.name} finished but returned {problem}"
            else:
                fill_outputs(result, out)
    save_result(run.results_root, result)
    return result


def planned_result(
    job: Job, params: CalculationParameters, run: RunContext, engine: Engine
) -> StructureResult:
    """Return the document of ``job`` as it stands before it starts: ``not-started``."""
    result = make_result(job, params, run, JobStatus(Status.not_started, NOT_STARTED), engine)
    result.workdir = None
    return result


def planned_job(result: StructureResult, work_dir: Path) -> Job:
    """Return the job a planned document stands for, in its folder under ``work_dir``."""
    atoms = read_structure_text(result.input_structure, "extxyz", result.name)[0].atoms
    job = Job(
        result.index, result.name, atoms, work_dir / result.id, result.input_key, result.parent_id
    )
    job.__dict__["input_extxyz"] = result.input_structure
    return job


def settle_unfinished(
    paths: RunPaths, run: RunContext, params: CalculationParameters | None
) -> list[StructureResult]:
    """Store a document for each planned structure of a run that ended without one; return
    every planned structure's document.

    A structure whose folder says it completed is parsed (given ``params``), so finished
    work is not lost; one that ended otherwise keeps what its folder says; one an engine
    had claimed is ``stopped``; the rest are ``not-started``.
    """
    settled = []
    for planned in load_plan(paths.plan_file):
        stored = load_result(run.results_root, run.flow_run_id, planned.id)
        if stored is not None and stored.status is not Status.not_started:
            settled.append(stored)
        else:
            settled.append(_settle(planned, paths.work_dir, run, params))
    return settled


def _settle(
    planned: StructureResult,
    work_dir: Path,
    run: RunContext,
    params: CalculationParameters | None,
) -> StructureResult:
    """Return (and store) the document of a planned structure from what its folder holds."""
    directory = work_dir / planned.id
    try:
        status = JobStatus.read(directory)
    except (OSError, ValueError, TypeError):
        status = None
    if status is not None and status.completed and params is not None:
        try:
            job = planned_job(planned, work_dir)
            return parse_job(job, status, params, run, get_engine(params.engine))
        except Exception:  # settling must go on; the structure is stopped
            status = None
    if status is not None and not status.completed:
        update = {"status": status.status, "message": status.message}
    elif status is not None or (directory / CLAIM_FILE).exists():
        update = {"status": Status.stopped, "message": STOPPED}
    else:
        update = {"status": Status.not_started, "message": NOT_STARTED}
    if directory.is_dir():
        update["workdir"] = str(directory)
    result = planned.model_copy(update=update | {"created_at": datetime.now(timezone.utc)})
    save_result(run.results_root, result)
    return result
