"""Workflows: steps chained through stored results, select, provenance, and bad specs."""

from __future__ import annotations

import asyncio
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.build import molecule
from ase.io import read, write
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from atomforge.engines.errors import InputError
from atomforge.flows.cli import main
from atomforge.flows.settings import get_settings
from atomforge.flows.store.files import lineage, query_results
from atomforge.flows.workflow import resolve_spec, workflow
from atomforge.flows.workflows.select import Select, parse_where
from atomforge.flows.workflows.spec import load_spec, parse_spec

WATER_GFN2_HARTREE = -5.070544351
"""Water optimized with GFN2-xTB: xtb 6.5.1 and tblite 0.8.0 agree to 1e-8 Eh
(../shared/README.md, reference numbers)."""


def _molecules(tmp_path: Path, names: tuple[str, ...]) -> Path:
    folder = tmp_path / "molecules"
    folder.mkdir()
    for name in names:
        write(folder / f"{name}.xyz", molecule(name), format="xyz")
    return folder


def _spec_file(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _artifact_keys(flow_run_id: str) -> set[str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key for artifact in found if artifact.key}


def test_workflow_chains_steps_selects_and_records_provenance(tmp_path, capsys):
    _molecules(tmp_path, ("H2O", "NH3", "CH4"))
    spec = _spec_file(
        tmp_path,
        {
            "source": {"path": "molecules"},
            "steps": [
                {"name": "preopt", "engine": "xtb", "options": {"method": "GFN1-xTB"}},
                {
                    "name": "refine",
                    "engine": "tblite",
                    "select": {"top": 2, "by": "energy_per_atom"},
                },
                {
                    "name": "single",
                    "engine": "xtb",
                    "kind": "singlepoint",
                    "select": {"where": "converged and gap_eV > 5"},
                },
            ],
        },
    )
    report = asyncio.run(workflow(spec_file=str(spec)))
    assert [s.step for s in report.steps] == ["preopt", "refine", "single"]
    assert [(s.n_structures, s.n_completed) for s in report.steps] == [(3, 3), (2, 2), (2, 2)]
    lines = {line.name: line for line in report.lines}
    assert lines["CH4"].steps["refine"] == "not selected"
    assert "single" not in lines["CH4"].steps

    root = get_settings().resolved_results_root()
    final = {
        r.name: r for r in query_results(root, workflow_run_id=report.flow_run_id, step="single")
    }
    assert set(final) == {"H2O", "NH3"}
    water = final["H2O"]
    assert water.workflow_run_id == report.flow_run_id
    chain = lineage(root, water)
    assert [r.step for r in chain] == ["single", "refine", "preopt"]
    assert [r.engine for r in chain] == ["xtb", "tblite", "xtb"]
    assert chain[0].parent_id == chain[1].ref and chain[1].parent_id == chain[2].ref
    assert chain[2].parent_id is None
    started, relaxed = (
        read(StringIO(text), format="extxyz")
        for text in (chain[0].input_structure, chain[1].final_structure)
    )
    assert np.allclose(started.positions, relaxed.positions, atol=1e-7)
    assert chain[1].energy_hartree == pytest.approx(WATER_GFN2_HARTREE, abs=2e-6)
    assert chain[0].energy_hartree == pytest.approx(chain[1].energy_hartree, abs=1e-6)
    assert lines["H2O"].last_id == water.ref

    assert {"workflow-summary", "workflow-lines"} <= _artifact_keys(report.flow_run_id)
    with get_client(sync_client=True) as client:
        names = [client.read_flow_run(s.flow_run_id).name for s in report.steps]
        assert client.read_flow_run(report.flow_run_id).name == "workflow: spec.yaml"
    assert names[1] == "refine: tblite optimize, 2 stored result(s)"
    assert names[0] == "preopt: xtb optimize, molecules"
    assert {"workflow-step-table", "workflow-step-summary"} <= _artifact_keys(
        report.steps[1].flow_run_id
    )

    assert main(["show", "--chain", water.ref]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("single: xtb singlepoint completed")
    assert "refine: tblite optimize completed" in shown[1]
    assert "preopt: xtb optimize completed" in shown[2]
    assert shown[3].strip() == f"<- input: {tmp_path / 'molecules'}, structure H2O"


def test_rerun_workflow_reuses_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOMFORGE_REUSE", "true")
    monkeypatch.setenv("ATOMFORGE_HOME", str(tmp_path / "home"))
    folder = _molecules(tmp_path, ("H2O", "NH3"))
    spec = {
        "source": {"path": str(folder)},
        "steps": [
            {"name": "pre", "engine": "xtb", "options": {"method": "GFN1-xTB"}},
            {"name": "sp", "engine": "xtb", "kind": "singlepoint"},
        ],
    }
    first = asyncio.run(workflow(parse_spec(spec)))
    second = asyncio.run(workflow(parse_spec(spec)))
    root = get_settings().resolved_results_root()
    again = query_results(root, workflow_run_id=second.flow_run_id)
    assert len(again) == 4 and all(r.reused_from for r in again)
    before = {(r.step, r.name): r for r in query_results(root, workflow_run_id=first.flow_run_id)}
    for result in again:
        assert result.energy_eV == before[(result.step, result.name)].energy_eV


def test_structure_failing_a_step_drops_out_and_is_reported(tmp_path):
    folder = _molecules(tmp_path, ("H2O", "HF"))
    spec = parse_spec(
        {
            "source": {"path": str(folder)},
            "steps": [
                {"name": "xtb", "engine": "xtb", "options": {"method": "GFN1-xTB"}},
                {"name": "emt", "engine": "emt", "kind": "singlepoint"},
            ],
        }
    )
    report = asyncio.run(workflow(spec))
    lines = {line.name: line for line in report.lines}
    assert lines["H2O"].steps["emt"].endswith("eV/atom")
    assert lines["HF"].steps["emt"].startswith("invalid:")
    assert "F" in lines["HF"].steps["emt"]
    assert lines["HF"].last_id.endswith("HF") and report.steps[1].n_completed == 1


def test_a_step_past_the_failure_fraction_fails_and_stops_the_workflow(tmp_path):
    folder = _molecules(tmp_path, ("H2O", "NH3"))
    spec = parse_spec(
        {
            "source": {"path": str(folder)},
            "steps": [
                {"name": "pre", "engine": "xtb", "kind": "singlepoint", "timeout_seconds": 0.001},
                {"name": "next", "engine": "xtb"},
            ],
        }
    )
    state = asyncio.run(workflow(spec, return_state=True))
    assert state.is_failed()
    assert "step 'pre': flow run" in state.message
    assert "2 of 2 failed, more than max_failed_fraction 0.5 allows" in state.message


def test_workflow_fails_when_a_step_has_nothing_left(tmp_path):
    folder = _molecules(tmp_path, ("H2O",))
    spec = parse_spec(
        {
            "source": {"path": str(folder)},
            "steps": [
                {"name": "pre", "engine": "xtb", "kind": "singlepoint"},
                {"name": "next", "engine": "xtb", "select": {"where": "gap_eV > 100"}},
            ],
        }
    )
    state = asyncio.run(workflow(spec, return_state=True))
    assert state.is_failed()
    assert "step 'next': nothing left to compute: select kept none of the 1" in state.message
    assert "workflow-summary" in _artifact_keys(str(state.state_details.flow_run_id))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"source": {"path": "molecules"}, "steps": []}, "steps: List should have at least 1"),
        (
            {"source": {"path": "molecules"}, "steps": [{"name": "a", "engine": "gaussian"}]},
            "steps.0.engine: Input should be",
        ),
        (
            {"source": {"path": "molecules"}, "steps": [{"name": "a", "colour": "red"}]},
            "steps.0.colour: Extra inputs are not permitted",
        ),
        (
            {
                "source": {"path": "molecules"},
                "steps": [
                    {"name": "a", "engine": "emt"},
                    {"name": "b", "select": {"top": 1, "by": "gap"}},
                ],
            },
            "step 'b': select reads gap_eV, which emt (step 'a') does not produce",
        ),
        (
            {
                "source": {"path": "molecules"},
                "steps": [{"name": "a"}, {"name": "b", "select": {"where": "colour > 1"}}],
            },
            "unknown field 'colour'",
        ),
        (
            {"source": {"path": "molecules"}, "steps": [{"name": "a", "select": {"top": 1}}]},
            "step 'a': the first step has nothing to select from",
        ),
        (
            {"source": {"path": "molecules"}, "steps": [{"name": "a"}, {"name": "a"}]},
            "the name 'a' is used twice",
        ),
        (
            {"source": {"path": "molecules"}, "steps": [{"name": "a", "kind": "md"}]},
            "step 'a': xtb cannot compute md",
        ),
        (
            {"source": {"path": "missing"}, "steps": [{"name": "a"}]},
            "no such structure",
        ),
    ],
)
def test_bad_spec_stops_with_one_line_before_any_engine(tmp_path, capsys, spec, message):
    _molecules(tmp_path, ("H2O",))
    assert main(["workflow", str(_spec_file(tmp_path, spec))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not query_results(get_settings().resolved_results_root(), step="a")


def test_spec_file_that_is_not_yaml_is_refused_in_one_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("source: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML/JSON"):
        load_spec(path)


def test_where_reads_flags_and_comparisons():
    conditions = parse_where("converged and gap_eV >= 3 and not n_steps")
    assert [(c.field, c.value) for c in conditions] == [
        ("converged", 0.0),
        ("gap_eV", 3.0),
        ("n_steps", 0.0),
    ]
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_where("gap_eV > abc")
    with pytest.raises(ValueError, match="needs 'top', 'where'"):
        Select()


def test_a_spec_file_wins_over_a_default_spec_and_one_of_them_is_needed(tmp_path):
    _molecules(tmp_path, ("H2O",))
    path = _spec_file(tmp_path, {"source": {"path": "molecules"}, "steps": [{"name": "f"}]})
    default = parse_spec({"source": {"path": str(tmp_path)}, "steps": [{"name": "d"}]})
    assert resolve_spec(default, str(path)).steps[0].name == "f"
    assert resolve_spec(default, None).steps[0].name == "d"
    with pytest.raises(InputError, match="give a workflow 'spec' or a 'spec_file'"):
        resolve_spec(None, None)
