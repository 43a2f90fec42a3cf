"""The contract every registered engine keeps, checked over the registry (built-in or plug-in)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from atomforge.engines.base import Command, Engine, EngineOptions
from atomforge.engines.errors import InputError
from atomforge.engines.parameters import CalculationKind
from atomforge.engines.registry import engine_classes, engine_names, parameters_model

ENGINES = engine_names()


def _fields_without_description(model: type[BaseModel]) -> list[str]:
    return [name for name, field in model.model_fields.items() if not field.description]


def test_the_registry_holds_every_seed_engine():
    assert {"xtb", "tblite", "emt", "espresso", "lammps", "vasp"} <= set(ENGINES)


@pytest.mark.parametrize("name", ENGINES)
def test_engine_says_what_it_is_and_what_it_needs(name):
    cls = engine_classes()[name]
    assert issubclass(cls, Engine) and cls.name == name
    assert cls.description and cls.requires
    assert cls.kinds <= set(CalculationKind) and cls.kinds
    assert cls.log_name


@pytest.mark.parametrize("name", ENGINES)
def test_engine_options_are_a_described_model_with_defaults(name):
    options = engine_classes()[name].options_model
    assert issubclass(options, EngineOptions)
    assert _fields_without_description(options) == []
    options()


@pytest.mark.parametrize("name", ENGINES)
def test_parameters_of_each_engine_render_as_a_form(name):
    model = parameters_model(name)
    schema = model.model_json_schema()
    assert schema["properties"]["engine"]["const"] == name
    options = engine_classes()[name].options_model
    assert options.__name__ in schema["$defs"]
    assert _fields_without_description(model) == []
    assert model().engine == name


@pytest.mark.parametrize("name", ENGINES)
def test_engine_is_installed_here_or_says_in_one_line_what_is_missing(name):
    engine = engine_classes()[name]()
    params = parameters_model(name)()
    try:
        engine.check_installed(params)
    except InputError as exc:
        assert name == "vasp", f"{name} is not installed here: {exc}"
        assert "\n" not in str(exc)
    else:
        command = engine.command(params, [Path("job")])
        assert isinstance(command, Command) and all(isinstance(a, str) for a in command.argv)


def test_the_simulate_flow_form_offers_each_engine_with_its_options():
    from atomforge.flows.simulate import simulate

    schema = simulate.parameters.model_dump()
    definitions = schema["definitions"]
    form = definitions["SimulationParameters"]["properties"]
    assert form["engine"]["enum"] == ENGINES
    assert not {"oneOf", "anyOf", "discriminator"} & set(schema["properties"]["parameters"])
    for name in ENGINES:
        assert form[name]["$ref"].endswith(engine_classes()[name].options_model.__name__)
        options = engine_classes()[name].options_model
        assert options.__name__ in definitions, name
        described = definitions[options.__name__]["properties"]
        assert all(field.get("description") for field in described.values()), name


PLUGIN = '''
from pathlib import Path

from atomforge.engines.base import Command, EngineOptions, EngineResults
from atomforge.engines.emt import EmtEngine


class EchoOptions(EngineOptions):
    """Options of a plug-in engine."""


class EchoEngine(EmtEngine):
    """A plug-in engine from another package: EMT under another name."""

    name = "echo"
    description = "a plug-in engine"
    requires = "nothing"
    options_model = EchoOptions
'''


def test_another_package_adds_an_engine_through_the_entry_point_group(tmp_path):
    (tmp_path / "echo_engine.py").write_text(PLUGIN)
    dist = tmp_path / "echo_engine-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-engine\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[atomforge.engines]\necho = echo_engine:EchoEngine\n")
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    atomforge = str(Path(sys.executable).with_name("atomforge"))
    out = subprocess.run(
        [atomforge, "engines", "echo"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("echo: a plug-in engine\n  needs: nothing\n")
    check = "from atomforge.engines import make_parameters; print(make_parameters('echo').engine)"
    out = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "echo", out.stderr


def test_the_form_takes_the_ui_shape_and_the_engine_specific_shape_alike():
    from atomforge.engines import make_parameters
    from atomforge.flows.models import SimulationParameters

    expected = make_parameters("espresso", kind="singlepoint", options={"ecutwfc": 25})
    shapes = [
        {"engine": "espresso", "kind": "singlepoint", "espresso": {"ecutwfc": 25}},
        {"engine": "espresso", "kind": "singlepoint", "options": {"ecutwfc": 25}},
        expected,
    ]
    for shape in shapes:
        assert SimulationParameters.model_validate(shape).resolve() == expected
