"""The requests of the batched deployment: read and check each, group them, and make one
source of a group's structures.

A request is a flow run of ``simulate/batched``: the ``simulate`` flow's parameters
(``source``, ``parameters``, ``options``). :func:`prepare` checks them as ``simulate``
does (the parameters form, then :func:`~atomforge.flows.validation.check_inputs`: input
folders, size limit, reading, geometry, the engine's own checks, exactly one structure),
so a bad request fails alone with a one-line message before any batch starts.
:func:`group` puts together the requests a single ``screen`` run can compute (identical
resolved parameters and options), and :func:`batch_source` writes their structures as
one multi-frame extended XYZ text, each frame named after its request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ParameterBindError, ParameterTypeError
from prefect.flows import Flow

from atomforge.engines.errors import AtomforgeError, InputError
from atomforge.engines.parameters import CalculationParameters
from atomforge.engines.structures import NamedStructure, safe_name, to_extxyz
from atomforge.flows.models import RunOptions, StructureSource
from atomforge.flows.validation import check_inputs

NOT_GROUPED = frozenset({"run_dir", "skip_invalid", "max_failed_fraction"})
"""Options that do not decide how a structure is computed: a batch run works in its own
folder, skips nothing (each request has one valid structure) and never fails for the
requests' failures (each request ends on its own)."""


@dataclass
class Request:
    """One claimed request: its flow run, and once prepared its inputs or why it is bad."""

    run: FlowRun
    claimed_at: float
    source: StructureSource | None = None
    params: CalculationParameters | None = None
    options: RunOptions | None = None
    structure: NamedStructure | None = None
    error: str | None = None
    batch_name: str = ""
    """The name of its structure in its batch run (see :func:`unique_names`)."""

    @property
    def id(self) -> str:
        """Return the request's flow run id as text."""
        return str(self.run.id)


def one_line(exc: BaseException) -> str:
    """Return ``exc`` as one line of at most 500 characters: atomforge's own errors and
    Prefect's parameter errors as they are, others after their type."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (AtomforgeError, ParameterTypeError, ParameterBindError)):
        return text[:500]
    return f"{type(exc).__name__}: {text}"[:500]


def prepare(request: Request, flow: Flow) -> Request:
    """Check ``request`` against ``flow``'s parameters (the ``simulate`` flow) and read its
    one structure; return it with its inputs set, or with ``error`` saying (one line) why
    it cannot be computed. Reads files: call it in a thread."""
    try:
        bound = flow.validate_parameters(request.run.parameters or {})
        source: StructureSource = bound["source"]
        params = bound["parameters"]
        params = params if isinstance(params, CalculationParameters) else params.resolve()
        options: RunOptions = bound["options"]
        validated = check_inputs(source, params)
        found = len(validated.structures) + len(validated.rejected)
        if found != 1:
            raise InputError(f"simulate takes one structure, the source has {found}: use screen")
    except Exception as exc:  # any bad input fails this request alone
        request.error = one_line(exc)
        return request
    request.source, request.params, request.options = source, params, options
    request.structure = validated.structures[0]
    return request


def group_key(request: Request) -> str:
    """Return what requests computed in one batch run share: the resolved parameters and
    the options that change what is computed."""
    assert request.params is not None and request.options is not None
    options = request.options.model_dump(mode="json", exclude=set(NOT_GROUPED))
    parameters = request.params.model_dump(mode="json")
    return json.dumps({"parameters": parameters, "options": options}, sort_keys=True)


def group(requests: list[Request]) -> list[list[Request]]:
    """Return the prepared requests (no ``error``) in groups of identical
    :func:`group_key`, in the order of each group's first request."""
    groups: dict[str, list[Request]] = {}
    for request in requests:
        if request.error is None:
            groups.setdefault(group_key(request), []).append(request)
    return list(groups.values())


def unique_names(requests: list[Request]) -> dict[str, Request]:
    """Name each request's structure in its batch run, and return the requests by those
    names: the first eight hex digits of the request's id, then the structure's own
    name (the whole id where eight collide)."""
    named: dict[str, Request] = {}
    for request in requests:
        assert request.structure is not None
        name = safe_name(f"{request.run.id.hex[:8]}-{request.structure.name}")
        if name in named:
            name = safe_name(f"{request.run.id.hex}-{request.structure.name}")
        request.batch_name = name
        named[name] = request
    return named


def batch_source(requests: list[Request]) -> StructureSource:
    """Return the structures of ``requests`` as one inline multi-frame extended XYZ
    source, each frame named as :func:`unique_names` says (call that first)."""
    frames = []
    for request in requests:
        assert request.structure is not None
        atoms = request.structure.atoms.copy()
        atoms.calc = None
        atoms.info["name"] = request.batch_name
        frames.append(to_extxyz(atoms))
    return StructureSource(text="".join(frames), format="extxyz")


def batch_options(request: Request) -> RunOptions:
    """Return the options of the batch run of ``request``'s group: the request's, in the
    batch's own folder, never failing for the requests' failures."""
    assert request.options is not None
    return request.options.model_copy(
        update={"run_dir": None, "skip_invalid": True, "max_failed_fraction": 1.0}
    )
