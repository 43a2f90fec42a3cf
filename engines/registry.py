"""The engines atomforge knows: one list, extended by other packages through entry points.

A package adds an engine by naming its class in the ``atomforge.engines`` entry-point
group (``[project.entry-points."atomforge.engines"] myengine = "mypkg.engine:MyEngine"``).
The parameters model of each engine (its ``options`` included) is built from this list,
so the CLI, the Python API and the Prefect UI all offer exactly the registered engines.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, create_model

from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationParameters

if TYPE_CHECKING:
    from atomforge.engines.base import Engine

ENTRY_POINT_GROUP = "atomforge.engines"
BUILTIN_ENGINES = {
    "xtb": "atomforge.engines.xtb:XtbEngine",
    "tblite": "atomforge.engines.tblite_engine:TbliteEngine",
    "emt": "atomforge.engines.emt:EmtEngine",
    "espresso": "atomforge.engines.espresso:EspressoEngine",
    "lammps": "atomforge.engines.lammps:LammpsEngine",
    "vasp": "atomforge.engines.vasp:VaspEngine",
    "chgnet": "atomforge.engines.chgnet:ChgnetEngine",
    "mace": "atomforge.engines.mace_engine:MaceEngine",
}


def _load(target: str) -> type[Engine]:
    """Return the engine class named ``module:Class``."""
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


@cache
def _targets() -> dict[str, str | EntryPoint]:
    """Return where each engine class is, by name, without importing any: the built-in
    ones, then those of entry points."""
    targets: dict[str, str | EntryPoint] = dict(BUILTIN_ENGINES)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(point.name, point)
    return targets


@cache
def engine_class(name: str) -> type[Engine]:
    """Return the class of engine ``name``, importing its module only (KeyError if unknown)."""
    target = _targets()[name]
    return _load(target) if isinstance(target, str) else target.load()


def engine_classes() -> dict[str, type[Engine]]:
    """Return every engine class by name: the built-in ones, then those of entry points."""
    return {name: engine_class(name) for name in _targets()}


def engine_names() -> list[str]:
    """Return the names of all engines, sorted (no engine module is imported)."""
    return sorted(_targets())


def get_engine(name: str) -> Engine:
    """Return a new engine adapter for ``name``, or raise InputError for an unknown one."""
    if name not in _targets():
        raise InputError(f"unknown engine {name!r} (available: {', '.join(engine_names())})")
    return engine_class(name)()


def _model_name(cls: type[Engine]) -> str:
    """Return the name of the parameters model of engine class ``cls``: ``XtbParameters``."""
    return f"{cls.__name__.removesuffix('Engine')}Parameters"


@cache
def parameters_model(name: str) -> type[CalculationParameters]:
    """Return the parameters model of engine ``name``: the shared fields plus its options.

    The model is importable from this module by its name (``registry.XtbParameters``), so
    pickle sends it to Dask workers by reference instead of rebuilding the class there.
    """
    cls = engine_class(name)
    return create_model(
        _model_name(cls),
        __module__=__name__,
        __base__=CalculationParameters,
        __doc__=f"How to compute each structure with {name}: {cls.description}.",
        engine=(Literal[name], Field(name, description="The engine: " + cls.description)),
        options=(
            cls.options_model,
            Field(default_factory=cls.options_model, description=f"Options of {name}."),
        ),
    )


def __getattr__(name: str) -> type[CalculationParameters]:
    """Return the parameters model called ``name`` (module attribute look-up, PEP 562)."""
    for engine, cls in engine_classes().items():
        if _model_name(cls) == name:
            return parameters_model(engine)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def parameters_type() -> Any:
    """Return the union of every engine's parameters model, discriminated by ``engine``."""
    models = tuple(parameters_model(name) for name in engine_names())
    return Annotated[Union[models], Field(discriminator="engine")]  # noqa: UP007


def parse_parameters(data: dict[str, Any] | CalculationParameters) -> CalculationParameters:
    """Return ``data`` validated as the parameters of the engine it names.

    Raises InputError with one line for an unknown engine or a wrong field.
    """
    if isinstance(data, CalculationParameters):
        return data
    engine = data.get("engine", "xtb")
    if engine not in _targets():
        get_engine(engine)
    try:
        return parameters_model(engine).model_validate({**data, "engine": engine})
    except ValidationError as exc:
        raise InputError(validation_line(exc)) from None


def make_parameters(engine: str = "xtb", **fields: Any) -> CalculationParameters:
    """Return validated parameters for ``engine`` (defaults for every field not given)."""
    return parse_parameters({"engine": engine, **fields})


def validation_line(exc: ValidationError) -> str:
    """Return the first problem of a pydantic error as one line, naming the field."""
    err = exc.errors()[0]
    loc = err["loc"]
    if loc and loc[0] in _targets():
        loc = loc[1:]
    where = ".".join(str(p) for p in loc)
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
