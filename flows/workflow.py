"""The ``workflow`` flow: a source of structures through an ordered list of steps.

Each step is a ``workflow-step`` flow run (a subflow, or a run of a deployment on another
work pool) with the same four tasks as a screen; its input is the previous step's final
structures, narrowed by the step's ``select``. A structure that fails drops out and is
reported; the workflow fails only when a step is left with nothing to compute.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.context import FlowRunContext
from prefect.deployments import arun_deployment
from prefect.logging import get_run_logger

from atomforge.engines.errors import InputError, WorkflowError
from atomforge.flows.models import (
    DEFAULT_OPTIONS,
    RunOptions,
    SimulationParameters,
    StructureResult,
    StructureSource,
)
from atomforge.flows.pipeline import Lineage, run_structures
from atomforge.flows.scheduling.dask_runner import simulation_flow_options
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import query_results
from atomforge.flows.workflows.spec import WorkflowSpec, WorkflowStep, load_spec
from atomforge.flows.workflows.summary import (
    Lines,
    StepReport,
    WorkflowReport,
    summary_markdown,
    summary_rows,
)

DEPLOYMENT_POLL_SECONDS = 2.0


@flow(name="workflow-step", **simulation_flow_options())
async def workflow_step(
    source: StructureSource,
    parameters: SimulationParameters,
    step: str,
    options: RunOptions = DEFAULT_OPTIONS,
    workflow_run_id: str | None = None,
) -> StepReport:
    """Compute one workflow step's structures; return how many completed.

    The step ends Failed, with its counts, when more of its structures failed than
    ``options.max_failed_fraction`` allows, as a screen does; its workflow then stops.
    """
    params = parameters.resolve()
    title = f"step {step}: {params.engine} {params.kind.value}"
    lineage = Lineage(workflow_run_id, step) if workflow_run_id else None
    outcome = await run_structures(source, params, options, title, lineage)
    await outcome.publish("workflow-step", title)
    report = StepReport(
        step=step,
        flow_run_id=str(FlowRunContext.get().flow_run.id),
        engine=params.engine,
        kind=params.kind.value,
        n_structures=len(outcome.results),
        n_completed=sum(result.ok for result in outcome.results),
    )
    return outcome.final_state(report)


def _step_options(spec: WorkflowSpec, position: int, step: WorkflowStep) -> RunOptions:
    """Return the run options of a step: the spec's, each step in its own folder, and
    after the first step invalid structures dropped (and reported) rather than fatal."""
    run_dir = f"{spec.options.run_dir}/{step.name}" if spec.options.run_dir else None
    skip = spec.options.skip_invalid or position > 0
    return spec.options.model_copy(update={"run_dir": run_dir, "skip_invalid": skip})


async def _run_step(
    step: WorkflowStep, source: StructureSource, options: RunOptions, workflow_run_id: str
) -> tuple[StepReport, list[StructureResult]]:
    """Run one step where it says (here, or as a deployment run); return its report and
    its stored results in input order. Raise WorkflowError if its flow run failed."""
    parameters = SimulationParameters.model_validate(step.parameters())
    if step.deployment:
        flow_run = await arun_deployment(
            step.deployment,
            parameters={
                "source": source.model_dump(mode="json", exclude_none=True),
                "parameters": parameters.model_dump(mode="json"),
                "step": step.name,
                "options": options.model_dump(mode="json"),
                "workflow_run_id": workflow_run_id,
            },
            poll_interval=DEPLOYMENT_POLL_SECONDS,
        )
        state, flow_run_id = flow_run.state, str(flow_run.id)
    else:
        state = await workflow_step(
            source, parameters, step.name, options, workflow_run_id, return_state=True
        )
        flow_run_id = str(state.state_details.flow_run_id)
    if state is None or not state.is_completed():
        message = state.message if state is not None else "no state"
        raise WorkflowError(f"step {step.name!r}: flow run {flow_run_id} failed: {message}")
    root = get_settings().resolved_results_root()
    results = sorted(query_results(root, flow_run_id=flow_run_id), key=lambda r: r.index)
    params = parameters.resolve()
    report = StepReport(
        step=step.name,
        flow_run_id=flow_run_id,
        engine=params.engine,
        kind=params.kind.value,
        deployment=step.deployment,
        n_structures=len(results),
        n_completed=sum(result.ok for result in results),
    )
    return report, results


def resolve_spec(spec: WorkflowSpec | None, spec_file: str | None) -> WorkflowSpec:
    """Return the spec in ``spec_file`` if one is named (it wins over a deployment's
    default ``spec``), else ``spec``; InputError if neither is given."""
    if spec_file:
        return load_spec(spec_file)
    if spec is None:
        raise InputError("give a workflow 'spec' or a 'spec_file'")
    return spec


@flow(name="workflow", **simulation_flow_options())
async def workflow(
    spec: WorkflowSpec | None = None, spec_file: str | None = None
) -> WorkflowReport:
    """Run every step of a workflow (``spec``, or the file ``spec_file``) in order; return
    each step's report and each structure's line through the steps (the documents are in
    the result store).

    Args:
        spec: The workflow: where the structures come from, and the steps in order.
        spec_file: Path of a YAML or JSON workflow spec; when given, it is used instead
            of spec.
    """
    spec = resolve_spec(spec, spec_file)
    logger = get_run_logger()
    workflow_run_id = str(FlowRunContext.get().flow_run.id)
    report = WorkflowReport(flow_run_id=workflow_run_id, name=spec.name)
    lines = Lines()
    try:
        await _run_steps(spec, workflow_run_id, report, lines)
    except WorkflowError as exc:
        logger.error("workflow %s stopped: %s", spec.name, exc)
        report.lines = lines.ordered()
        await _publish(report)
        raise
    report.lines = lines.ordered()
    await _publish(report)
    return report


async def _run_steps(
    spec: WorkflowSpec, workflow_run_id: str, report: WorkflowReport, lines: Lines
) -> None:
    """Run the steps in order, each on what the one before selected; fill ``report`` and
    ``lines``. Raise WorkflowError when a step is left with nothing to compute."""
    logger = get_run_logger()
    source, previous = spec.source, []
    for position, step in enumerate(spec.steps):
        if position:
            completed = [r for r in previous if r.ok]
            chosen = step.select.apply(completed) if step.select else completed
            kept = {result.ref for result in chosen}
            lines.not_selected(step.name, [r for r in completed if r.ref not in kept])
            if not chosen:
                raise WorkflowError(
                    f"step {step.name!r}: nothing left to compute: select kept none of the "
                    f"{len(completed)} completed result(s) of step "
                    f"{spec.steps[position - 1].name!r}"
                )
            source = StructureSource(results=[result.ref for result in chosen])
            logger.info("step %s: %d structure(s) go on", step.name, len(chosen))
        step_report, previous = await _run_step(
            step, source, _step_options(spec, position, step), workflow_run_id
        )
        report.steps.append(step_report)
        lines.record(step.name, previous)
        logger.info(
            "step %s (%s): %d of %d completed, flow run %s",
            step.name,
            step_report.engine,
            step_report.n_completed,
            step_report.n_structures,
            step_report.flow_run_id,
        )
        if not step_report.n_completed:
            raise WorkflowError(f"step {step.name!r}: none of its structures completed")


async def _publish(report: WorkflowReport) -> None:
    """Publish the workflow's summary (markdown) and its lines (a table)."""
    steps = [step.step for step in report.steps]
    await acreate_markdown_artifact(
        summary_markdown(report), key="workflow-summary", description=f"workflow {report.name}"
    )
    await acreate_table_artifact(
        summary_rows(report.lines, steps),
        key="workflow-lines",
        description=f"workflow {report.name}: each structure through the steps",
    )
