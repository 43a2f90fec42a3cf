"""The ``atomforge`` command: run one structure, screen many, look at stored results.

Bad input is caught before any flow or engine starts: one line on stderr, exit code 2.
An engine failure exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar, get_args, get_origin

from atomforge.engines.errors import AtomforgeError, InputError
from atomforge.flows import interrupt, local_server

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from atomforge.engines.parameters import CalculationParameters
    from atomforge.flows.models import StructureResult, StructureSource
    from atomforge.flows.ranking import RankedStructure
    from atomforge.flows.workflows.spec import WorkflowSpec
    from atomforge.flows.workflows.summary import WorkflowReport

EXIT_ENGINE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
T = TypeVar("T")
EMBEDDED_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}
"""Prefect settings the command sets unless the environment does: no telemetry (its
heartbeat fails on a busy embedded database, or without a network, with a traceback),
and time for the embedded API to start on a loaded machine (Prefect's default is 20 s)."""


def set_embedded_prefect_defaults() -> None:
    """Set :data:`EMBEDDED_PREFECT_DEFAULTS` in this process's environment where it sets
    none of them. Returns None."""
    for name, value in EMBEDDED_PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


COMMAND_INPUT_ROOTS = '["/"]'
"""The command reads whatever structure file its user names (it runs as that user); the
input roots guard the runs that deployments and the inbox start."""


def _option(text: str) -> tuple[str, object]:
    """Return ``key=value`` parsed, the value as bool, int, float, a JSON list (``[...]``,
    e.g. LAMMPS's ``pair_coeff``) or str."""
    if "=" not in text:
        raise InputError(f"option {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    if raw.lower() in {"true", "false"}:
        return key, raw.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            continue
    if raw.startswith("["):
        try:
            return key, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"option {key!r}: not a JSON list: {exc}") from None
    return key, raw


def _options(pairs: list[str]) -> dict[str, object]:
    """Return ``-o key=value`` pairs as options; a dotted key (``input.system.nbnd``) nests."""
    options: dict[str, object] = {}
    for text in pairs:
        key, value = _option(text)
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise InputError(f"option {key!r} nests under a plain option")
        target[leaf] = value
    return options


def _add_calculation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options shared by ``run`` and ``screen``."""
    from atomforge.engines import engine_names
    from atomforge.engines.parameters import CalculationKind

    parser.add_argument(
        "--engine", default="xtb", help=f"the engine: {', '.join(engine_names())} (%(default)s)"
    )
    parser.add_argument(
        "--kind",
        default="optimize",
        choices=[kind.value for kind in CalculationKind],
        help="what to compute (%(default)s)",
    )
    parser.add_argument("--charge", default="0", help="total charge (%(default)s)")
    parser.add_argument("--multiplicity", default="1", help="spin multiplicity 2S+1 (%(default)s)")
    parser.add_argument(
        "--fmax",
        default=None,
        help="optimization force threshold in eV/A (engines optimizing through ASE; "
        "0.01 unless given)",
    )
    parser.add_argument(
        "--max-steps", default=None, help="most optimization or MD steps (500 unless given)"
    )
    parser.add_argument(
        "--timeout", default=None, help="seconds per structure before it is stopped (3600)"
    )
    parser.add_argument(
        "--cores", default=None, help="cores per structure: MPI ranks or OpenMP threads (1)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the result documents as JSON lines only"
    )
    parser.add_argument(
        "--relax-cell", action="store_true", help="optimize the cell too (periodic structures)"
    )
    parser.add_argument(
        "--no-forces", action="store_true", help="do not compute forces in a single point"
    )
    parser.add_argument(
        "--format", default=None, help="ASE format of the structure file(s), if not guessed"
    )
    parser.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        help="an engine option key=value, repeatable; dotted keys nest "
        "(atomforge engines NAME lists them)",
    )
    parser.add_argument(
        "--run-dir", default=None, help="folder under the work root (default: the run id)"
    )
    parser.add_argument(
        "--no-reuse",
        action="store_true",
        help="compute every structure, even one with a stored result for identical inputs",
    )


def _parameters(args: argparse.Namespace) -> CalculationParameters:
    """Return validated simulation parameters from the command line."""
    from atomforge.engines import parse_parameters

    fields = {
        "cores": args.cores,
        "engine": args.engine,
        "kind": args.kind,
        "charge": args.charge,
        "multiplicity": args.multiplicity,
        "fmax": args.fmax,
        "max_steps": args.max_steps,
        "timeout_seconds": args.timeout,
        "relax_cell": args.relax_cell,
        "forces": not args.no_forces,
        "options": _options(args.option),
    }
    return parse_parameters({k: v for k, v in fields.items() if v is not None})


def _source(args: argparse.Namespace) -> StructureSource:
    """Return the structure source named on the command line."""
    from atomforge.flows.models import StructureSource

    if args.structure == "-":
        return StructureSource(text=sys.stdin.read(), format=args.format)
    try:
        path = Path(args.structure).resolve()
    except (RuntimeError, OSError):
        raise InputError(f"{args.structure}: a symbolic link loop") from None
    return StructureSource(path=str(path), format=args.format)


def short_ref(result: StructureResult | RankedStructure) -> str:
    """Return the short reference ``atomforge show`` takes: run id prefix/result id."""
    run = getattr(result, "flow_run_id", None)
    return f"{run[:8]}/{result.id}" if run else result.id


def print_results(results: Sequence[StructureResult | RankedStructure]) -> None:
    """Print a table of results, one line each, ending in the id ``atomforge show`` takes."""
    print(
        f"{'#':>3} {'name':<24} {'formula':<12} {'status':<10} {'E / eV':>14} "
        f"{'E / Eh':>14} {'gap / eV':>9} {'conv':>5}  result"
    )
    for position, r in enumerate(results, start=1):
        energy = f"{r.energy_eV:14.6f}" if r.energy_eV is not None else f"{'':>14}"
        hartree = f"{r.energy_hartree:14.8f}" if r.energy_hartree is not None else f"{'':>14}"
        gap = f"{r.gap_eV:9.4f}" if r.gap_eV is not None else f"{'':>9}"
        conv = "" if r.converged is None else ("yes" if r.converged else "no")
        print(
            f"{position:>3} {r.name[:24]:<24} {r.formula[:12]:<12} {r.status:<10} {energy} "
            f"{hartree} {gap} {conv:>5}  {short_ref(r)}" + (f"  {r.message}" if r.message else "")
        )


def print_json_lines(results: Sequence[StructureResult]) -> None:
    """Print each result document as one line of JSON."""
    for result in results:
        print(result.model_dump_json())


def _prepare(args: argparse.Namespace, skip_invalid: bool = False):
    """Return source, parameters and options after checking them all (InputError if bad)."""
    from pydantic import ValidationError

    from atomforge.engines.registry import validation_line
    from atomforge.flows.models import RunOptions
    from atomforge.flows.paths import run_paths, writable_roots
    from atomforge.flows.settings import get_settings
    from atomforge.flows.validation import check_inputs

    try:
        params = _parameters(args)
        source = _source(args)
        options = RunOptions(
            run_dir=args.run_dir,
            skip_invalid=skip_invalid,
            chunk_size=getattr(args, "chunk_size", None),
            reuse=False if args.no_reuse else None,
        )
    except ValidationError as exc:
        raise InputError(validation_line(exc)) from None
    writable_roots(get_settings())
    run_paths(get_settings(), "check", options.run_dir)
    validated = check_inputs(source, params, skip_invalid)
    if args.command == "run" and len(validated.structures) != 1:
        found = len(validated.structures)
        raise InputError(f"{args.structure}: run takes one structure, found {found}: use screen")
    return source, params, options


def run_flow(
    coroutine: Coroutine[Any, Any, T], runner_params: CalculationParameters | None = None
) -> T:
    """Return what the flow call ``coroutine`` returns; Ctrl-C cancels the run (raising
    :class:`interrupt.Interrupted`; Dask worker processes leave it to this one, see
    :mod:`atomforge.flows.worker_preload`). Without a configured Prefect API it runs on
    Prefect's embedded server, started here under a watchdog (see
    :mod:`atomforge.flows.embedded_server`). With ``runner_params``, the runner their
    chunks need starts (:func:`atomforge.flows.runner_start.start_runner`) once the API
    is set, so that it has the environment the chunks will have (in a command's child of
    the local server, forked from it: its only other thread waits on the caller's socket).
    """
    import dask

    from atomforge.flows.worker_preload import MODULE as WORKER_PRELOAD

    preload = dask.config.get("distributed.worker.preload", [])
    dask.config.set({"distributed.worker.preload": [*preload, WORKER_PRELOAD]})
    if local_server.configured_api_url() is None:
        from atomforge.flows import embedded_server

        try:
            embedded_server.start()
        except BaseException:  # Ctrl-C while it starts: the flow never ran
            coroutine.close()
            raise
    if runner_params is not None:
        from atomforge.flows.runner_start import start_runner

        start_runner(runner_params, fork=local_server.in_command_child())
    return interrupt.run(coroutine)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one structure; print its result. Return the exit code."""
    source, params, options = _prepare(args)
    from atomforge.flows.settings import get_settings
    from atomforge.flows.simulate import simulate
    from atomforge.flows.store.files import query_results, result_path

    state = run_flow(simulate(source, params, options, return_state=True), params)
    results = query_results(
        get_settings().resolved_results_root(), flow_run_id=str(state.state_details.flow_run_id)
    )
    if args.json:
        print_json_lines(results)
    else:
        print_results(results)
    if not state.is_completed():
        print(f"atomforge: error: {state.message}", file=sys.stderr)
        return EXIT_ENGINE_FAILED
    if not args.json:
        print(f"result: {result_path(get_settings().resolved_results_root(), results[0])}")
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    """Screen every structure of a file or folder; print the ranking. Return the exit code."""
    source, params, options = _prepare(args, args.skip_invalid)
    from atomforge.flows.screen import screen
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import iter_results

    state = run_flow(screen(source, params, options, args.rank_by, return_state=True), params)
    if not state.is_completed():
        print(f"atomforge: error: {state.message}", file=sys.stderr)
        return EXIT_ENGINE_FAILED
    report = state.result()
    if args.json:
        stored = {
            r.id: r
            for r in iter_results(get_settings().resolved_results_root(), report.flow_run_id)
        }
        print_json_lines([stored[line.id] for line in report.results if line.id in stored])
        return 0 if report.n_completed == report.n_structures else EXIT_ENGINE_FAILED
    print_results(report.results[: args.top])
    print(
        f"{report.n_completed} of {report.n_structures} completed; ranked by {report.rank_by};"
        f" run {report.flow_run_id}"
    )
    return 0 if report.n_completed == report.n_structures else EXIT_ENGINE_FAILED


def _check_workflow(spec: WorkflowSpec) -> None:
    """Raise InputError unless every step's engine is installed and the first step can
    compute the source (the later steps' structures are checked as they come)."""
    from atomforge.engines import get_engine
    from atomforge.flows.validation import check_inputs

    for step in spec.steps:
        params = step.resolve()
        try:
            get_engine(params.engine).check_installed(params)
        except InputError as exc:
            raise InputError(f"step {step.name!r}: {exc}") from None
    check_inputs(spec.source, spec.steps[0].resolve(), spec.options.skip_invalid)


def print_workflow(report: WorkflowReport) -> None:
    """Print each step's counts, then each structure's line through the steps."""
    for step in report.steps:
        print(
            f"step {step.step:<12} {step.engine:<8} {step.kind:<11} "
            f"{step.n_completed} of {step.n_structures} completed  run {step.flow_run_id}"
        )
    names = ["structure"] + [step.step for step in report.steps]
    rows = [[line.name] + [line.steps.get(name, "") for name in names[1:]] for line in report.lines]
    widths = [max(len(row[col]) for row in [names, *rows]) for col in range(len(names))]
    print()
    for row in [names, *rows]:
        print("  ".join(f"{text:<{width}}" for text, width in zip(row, widths)).rstrip())


def cmd_workflow(args: argparse.Namespace) -> int:
    """Run a workflow spec file; print its steps and lines (or every result as JSON)."""
    from atomforge.flows.paths import writable_roots
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import query_results
    from atomforge.flows.workflows.spec import load_spec

    spec = load_spec(args.spec)
    writable_roots(get_settings())
    if args.no_reuse:
        spec.options.reuse = False
    _check_workflow(spec)
    from atomforge.flows.workflow import workflow

    first = spec.steps[0]
    state = run_flow(
        workflow(spec, return_state=True), None if first.deployment else first.resolve()
    )
    run_id = str(state.state_details.flow_run_id)
    if args.json:
        root = get_settings().resolved_results_root()
        results = query_results(root, workflow_run_id=run_id)
        order = {step.name: position for position, step in enumerate(spec.steps)}
        print_json_lines(sorted(results, key=lambda r: (order.get(r.step or "", 0), r.index)))
    elif state.is_completed():
        print_workflow(state.result())
        print(f"workflow run {run_id}")
    if not state.is_completed():
        print(f"atomforge: error: {state.message}", file=sys.stderr)
        return EXIT_ENGINE_FAILED
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """Print stored results matching the filters. Return the exit code."""
    from atomforge.flows.ranking import rank
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import query_results

    results = query_results(
        get_settings().resolved_results_root(),
        flow_run_id=args.run,
        engine=args.engine,
        formula=args.formula,
        status=args.status,
        name=args.name,
        workflow_run_id=args.workflow,
        step=args.step,
        limit=args.limit,
    )
    if args.run:
        results = rank(results, "energy_per_atom")
    if args.json:
        print_json_lines(results)
    else:
        print_results(results)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """Print stored runs, newest first. Return the exit code."""
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import iter_runs

    print(
        f"{'flow run id':<36}  {'flow':<13} {'state':<9} {'engine':<8} {'done':>9}  "
        f"{'started (UTC)':<16}  message"
    )
    for run in list(iter_runs(get_settings().resolved_results_root()))[: args.limit]:
        label = run.step or run.flow_name
        print(
            f"{run.flow_run_id:<36}  {label[:13]:<13} {run.state:<9} {run.engine:<8} "
            f"{f'{run.n_completed}/{run.n_structures}':>9}  {run.started_at:%Y-%m-%d %H:%M}  "
            f"{run.message}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print one stored result document as JSON. Return the exit code."""
    from atomforge.flows.settings import get_settings
    from atomforge.flows.store.files import query_results

    root = get_settings().resolved_results_root()
    run_id, _, result_id = args.id.rpartition("/")
    if run_id:
        matches = query_results(root, flow_run_id=run_id, result_id=result_id)
    else:
        matches = query_results(root, result_id=args.id) or query_results(root, flow_run_id=args.id)
    if not matches:
        raise InputError(f"no stored result {args.id!r}")
    for r in matches:
        if args.chain:
            print_chain(root, r)
        else:
            print(json.dumps(r.model_dump(mode="json"), indent=1))
    return 0


def print_chain(root: Path, result: StructureResult) -> None:
    """Print ``result`` and the results it started from, back to the input it was given."""
    from atomforge.flows.store.files import lineage, load_run

    chain = lineage(root, result)
    for depth, r in enumerate(chain):
        energy = f"{r.energy_eV:.6f} eV" if r.energy_eV is not None else ""
        label = r.step or r.flow_name
        print(
            f"{'  ' * depth}{'<- ' if depth else ''}{label}: {r.engine} "
            f"{r.parameters.get('kind', '')} {r.status} {energy}  {r.ref}"
            + (f" (reused {r.reused_from})" if r.reused_from else "")
        )
    first = chain[-1]
    run = load_run(root, first.flow_run_id)
    origin = (run.source.get("path") or "inline structure text") if run else "unknown"
    if first.parent_id:
        origin = f"{first.parent_id} (not in the store)"
    print(f"{'  ' * len(chain)}<- input: {origin}, structure {first.name}")


def _type_name(annotation: object) -> str:
    """Return a type annotation as a person reads it: ``float | None``, ``nve|nvt|npt``."""
    if get_origin(annotation) is Literal:
        return "|".join(str(value) for value in get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def cmd_engines(args: argparse.Namespace) -> int:
    """Print each engine: what it computes, what it needs, its kinds and options. Return 0."""
    from atomforge.engines.registry import engine_classes

    for name, cls in sorted(engine_classes().items()):
        if args.name and name != args.name:
            continue
        print(f"{name}: {cls.description}")
        print(f"  needs: {cls.requires}")
        print(f"  kinds: {', '.join(sorted(kind.value for kind in cls.kinds))}")
        for field_name, field in cls.options_model.model_fields.items():
            kind = _type_name(field.annotation)
            default = (
                ""
                if field.is_required()
                else f" = {field.get_default(call_default_factory=True)!r}"
            )
            print(f"  -o {field_name} ({kind}{default}): {field.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job: an xTB water optimization and a small screening. Return the exit code."""
    from atomforge.flows.demo import run_demo

    return run_demo()


def cmd_service(args: argparse.Namespace) -> int:
    """Start, report on or stop the service (PostgreSQL, Prefect server, pool, worker)."""
    from atomforge.deployments.service import main as service_main

    return service_main([args.action])


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a run of a deployment at a priority; return the exit code."""
    from atomforge.deployments.submit import submit_command

    try:
        return submit_command(args.deployment, args.priority, args.param, args.wait)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def cmd_job_script(args: argparse.Namespace) -> int:
    """Print the SLURM job script a run would submit with the current settings."""
    from atomforge.flows.scheduling.slurm import job_script
    from atomforge.flows.settings import get_settings

    print(job_script(get_settings()), end="")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """Start, report on or stop this atomforge home's local server, or prepare the
    database new homes' servers start from. Return the exit code."""
    if args.action == "stop":
        stopped = local_server.stop()
        print("local server stopped" if stopped else "no local server was running")
        return 0
    if args.action == "prepare":
        try:
            kept = local_server.prepare()
        except RuntimeError as exc:
            print(f"atomforge: error: {exc}", file=sys.stderr)
            return 1
        print(f"new local servers start from {kept}")
        return 0
    if args.action == "start":
        local_server.wait_healthy(local_server.ensure())
    state, line = local_server.status()
    print(line)
    configured = local_server.configured_api_url()
    if configured:
        print(f"note: PREFECT_API_URL is set ({configured}): commands use that API")
    return 0 if state is not None else 1


def _version() -> str:
    """Return the installed atomforge version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atomforge")
    except PackageNotFoundError:
        return "unknown"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser that reports a bad command line in one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``atomforge: error: <message>`` (and where to get help); exit 2."""
        hint = "(--help lists the options)"
        print(f"atomforge: error: {self.prog}: {message} {hint}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``atomforge`` command."""
    from atomforge.engines.status import Status

    parser = OneLineParser(prog="atomforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="compute one structure")
    run.add_argument("structure", help="structure file, or - for XYZ on stdin")
    _add_calculation_arguments(run)
    run.set_defaults(func=cmd_run)
    scr = sub.add_parser("screen", help="compute and rank many structures")
    scr.add_argument("structure", help="folder of structure files or a multi-frame file")
    _add_calculation_arguments(scr)
    scr.add_argument(
        "--rank-by",
        default="energy_per_atom",
        choices=["energy_per_atom", "energy", "gap"],
        help="order of the ranking: energies lowest first, gap highest (%(default)s)",
    )
    scr.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="about this many structures per Dask task (default: one chunk per worker)",
    )
    scr.add_argument(
        "--skip-invalid",
        action="store_true",
        help="report invalid structures and compute the others, instead of stopping",
    )
    scr.add_argument(
        "--top", type=int, default=50, help="print this many ranking lines (%(default)s)"
    )
    scr.set_defaults(func=cmd_screen)
    res = sub.add_parser("results", help="query stored results")
    res.add_argument("--run", default=None, help="flow run id (or its prefix)")
    res.add_argument("--engine", default=None, help="only this engine's results")
    res.add_argument("--formula", default=None, help="Hill formula, e.g. H2O")
    res.add_argument(
        "--status", default=None, choices=[status.value for status in Status], help="how it ended"
    )
    res.add_argument("--name", default=None, help="part of the structure's name")
    res.add_argument("--workflow", default=None, help="workflow run id")
    res.add_argument("--step", default=None, help="workflow step name")
    res.add_argument("--limit", type=int, default=100, help="at most this many (%(default)s)")
    res.add_argument("--json", action="store_true", help="one JSON document per line")
    res.set_defaults(func=cmd_results)
    wf = sub.add_parser("workflow", help="run a workflow spec (YAML or JSON): steps in order")
    wf.add_argument("spec", help="workflow spec file")
    wf.add_argument("--json", action="store_true", help="every step's results as JSON lines")
    wf.add_argument(
        "--no-reuse", action="store_true", help="compute everything, even stored identical inputs"
    )
    wf.set_defaults(func=cmd_workflow)
    runs = sub.add_parser("runs", help="list stored runs")
    runs.add_argument("--limit", type=int, default=20, help="at most this many (%(default)s)")
    runs.set_defaults(func=cmd_runs)
    show = sub.add_parser("show", help="print a stored result document")
    show.add_argument("id", help="result id, run-id/result-id, or a run id")
    show.add_argument(
        "--chain", action="store_true", help="follow the result back through its parents"
    )
    show.set_defaults(func=cmd_show)
    engines = sub.add_parser("engines", help="list engines, what they need, and their options")
    engines.add_argument("name", nargs="?", default=None, help="only this engine")
    engines.set_defaults(func=cmd_engines)
    demo = sub.add_parser("demo", help="water optimization + small screening, printed")
    demo.set_defaults(func=cmd_demo)
    service = sub.add_parser(
        "service", help="PostgreSQL, Prefect server with auth, pool and queues, worker"
    )
    service.add_argument(
        "action",
        choices=["up", "status", "down", "env"],
        help="start what is not running, report each part, stop all, or print client settings",
    )
    service.set_defaults(func=cmd_service)
    submit = sub.add_parser("submit", help="submit a run of a deployment at a priority")
    submit.add_argument("deployment", help="flow/deployment name, e.g. simulate/simulate")
    submit.add_argument(
        "--priority",
        default="normal",
        choices=["urgent", "normal", "batch"],
        help="the queue it waits in: urgent runs start first, batch runs last (%(default)s)",
    )
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        help='a parameter as key=JSON, e.g. parameters=\'{"engine": "xtb"}\' (repeatable)',
    )
    submit.add_argument(
        "--wait", action="store_true", help="wait for the run; exit 1 unless it completed"
    )
    submit.set_defaults(func=cmd_submit)
    job = sub.add_parser(
        "job-script", help="print the SLURM job script runs submit (ATOMFORGE_SLURM_*)"
    )
    job.set_defaults(func=cmd_job_script)
    _add_server_parser(sub)
    return parser


def _add_server_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``server`` command to ``sub``."""
    server = sub.add_parser(
        "server",
        help="the local Prefect server and warm process commands use (started on first use)",
    )
    server.add_argument(
        "action",
        choices=["start", "status", "stop", "prepare"],
        help="start it (and wait until it answers), report on it (exit 1 if none), stop "
        "it, or prepare the database new homes' servers start from (.ci/setup does)",
    )
    server.set_defaults(func=cmd_server)


def server_parser() -> argparse.ArgumentParser:
    """Return a parser of the ``server`` command alone: it answers without importing
    the engines."""
    parser = OneLineParser(prog="atomforge")
    _add_server_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _interrupted(line: str) -> int:
    """Print ``line`` on stderr, if it is still there; return the exit code of an interrupt."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code.

    A command that runs a flow goes to the local server (see
    :mod:`atomforge.flows.local_server`) unless a Prefect API is configured or
    ``ATOMFORGE_LOCAL_SERVER`` is false; everything else runs here, importing only what
    it uses.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    set_embedded_prefect_defaults()
    if sys.stderr.isatty():
        os.environ.setdefault("ATOMFORGE_TERMINAL_PROGRESS", "true")
    os.environ.setdefault("ATOMFORGE_INPUT_ROOTS", COMMAND_INPUT_ROOTS)
    if argv[:1] and argv[0] in local_server.FLOW_COMMANDS and local_server.enabled():
        try:
            code = local_server.forward(argv)
        except (OSError, RuntimeError) as exc:
            print(f"atomforge: error: local server: {exc}", file=sys.stderr)
            return EXIT_ENGINE_FAILED
        if code is not None:
            return code
    parser = server_parser() if argv[:1] == ["server"] else build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except interrupt.Interrupted as exc:
        return _interrupted(exc.line())
    except KeyboardInterrupt:
        return _interrupted(f"atomforge: {interrupt.reason() or 'interrupted'}")
    except InputError as exc:
        print(f"atomforge: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AtomforgeError as exc:
        print(f"atomforge: error: {exc}", file=sys.stderr)
        return EXIT_ENGINE_FAILED


if __name__ == "__main__":
    sys.exit(main())
