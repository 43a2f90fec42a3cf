"""The `atomforge` command: results on success, one-line errors and exit 2 on bad input."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from atomforge.flows.cli import build_parser, main
from tests.conftest import ATOMFORGE, REPO, WATER_XYZ, run_atomforge


def _atomforge(*args: str, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return run_atomforge(os.environ | {"ATOMFORGE_HOME": str(home)}, *args, stdin=stdin)


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("", [], "structure file is empty"),
        ("3\n\nO 0 0\n", [], "cannot read structure"),
        ("2\n\nQq 0 0 0\nH 0 0 1\n", [], "unknown element 'Qq'"),
        ("2\n\nH 0 0 0\nH 0 0 0.2\n", [], "overlap"),
        (WATER_XYZ, ["--multiplicity", "2"], "multiplicity 2 is impossible"),
        (WATER_XYZ, ["--engine", "orca"], "unknown engine 'orca'"),
        (WATER_XYZ, ["--charge", "one"], "charge: Input should be a valid integer"),
        (WATER_XYZ, ["--run-dir", "../../escape"], "run_dir"),
        (WATER_XYZ, ["--option", "nonsense"], "must look like key=value"),
        (WATER_XYZ, ["-o", "method=GFN9"], "options.method: Input should be"),
        (WATER_XYZ, ["-o", "solvent.x=1", "-o", "solvent.x.y=2"], "nests under a plain option"),
        (WATER_XYZ, ["--kind", "md"], "xtb: no kind 'md'"),
        (WATER_XYZ, ["--cores", "zero"], "cores: Input should be a valid integer"),
        ("2\n\nH 0 0 0\nH 1000000 0 0.74\n", [], "spans 1e+06 A, more than 1000 A"),
        (WATER_XYZ, ["--kind", "foo"], "argument --kind: invalid choice: 'foo'"),
        (WATER_XYZ, ["-o", "solvent=nosuch"], "options.solvent: Input should be"),
        (
            "10001\n\n"
            + "".join(f"He {i % 22 * 3} {i // 22 % 22 * 3} {i // 484 * 3}\n" for i in range(10001)),
            [],
            "xtb: 10001 atoms is more than it takes (10000)",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_engine(tmp_path, content, args, message):
    structure = tmp_path / "in.xyz"
    structure.write_text(content)
    home = tmp_path / "home"
    out = _atomforge("run", str(structure), *args, home=home)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atomforge: error:"), out.stderr
    assert message in lines[0]
    assert not (home / "work").exists() or not any((home / "work").iterdir())


def test_run_screen_and_query_results(tmp_path):
    home = tmp_path / "home"
    out = _atomforge("run", "-", "--kind", "singlepoint", home=home, stdin=WATER_XYZ)
    assert out.returncode == 0, out.stderr
    assert "completed" in out.stdout and "-5.0702" in out.stdout
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "water.xyz").write_text(WATER_XYZ)
    (folder / "h2.xyz").write_text("2\n\nH 0 0 0\nH 0 0 0.74\n")
    out = _atomforge("screen", str(folder), "--engine", "tblite", "--rank-by", "gap", home=home)
    assert out.returncode == 0, out.stderr
    assert "2 of 2 completed" in out.stdout
    out = _atomforge("results", "--formula", "H2O", home=home)
    assert out.returncode == 0 and out.stdout.count("H2O") == 2
    out = _atomforge("results", "--engine", "tblite", "--json", home=home)
    assert len(out.stdout.strip().splitlines()) == 2
    out = _atomforge("runs", home=home)
    assert out.stdout.count("Completed") == 2


def test_run_and_screen_print_only_json_lines_with_json(tmp_path):
    import json

    home = tmp_path / "home"
    out = _atomforge("run", "-", "--kind", "singlepoint", "--json", home=home, stdin=WATER_XYZ)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    document = json.loads(line)
    assert document["formula"] == "H2O" and document["status"] == "completed"
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "water.xyz").write_text(WATER_XYZ)
    (folder / "h2.xyz").write_text("2\n\nH 0 0 0\nH 0 0 0.74\n")
    out = _atomforge("screen", str(folder), "--kind", "singlepoint", "--json", home=home)
    assert out.returncode == 0, out.stderr
    documents = [json.loads(line) for line in out.stdout.splitlines()]
    assert [d["formula"] for d in documents] == ["H2O", "H2"]
    assert all(d["forces_eV_per_A"] for d in documents)


def test_engines_lists_each_engine_with_its_needs_and_options(tmp_path):
    out = _atomforge("engines", home=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("xtb", "tblite", "emt", "espresso", "lammps", "vasp"):
        assert f"\n{name}: " in f"\n{out.stdout}"
    assert "-o ecutwfc (float = " in out.stdout
    assert "-o ensemble (nve|nvt|npt = " in out.stdout


@pytest.mark.parametrize("command", ["run", "screen", "workflow", "results", "show", "runs"])
def test_every_option_explains_itself(command):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices[command]
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"atomforge {command} {action.option_strings}: no help"


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith("atomforge 0.1.0")


def test_engine_failure_is_one_line_without_a_traceback(tmp_path):
    from tests.test_flows import AR2_LJ

    structure = tmp_path / "ar2.extxyz"
    structure.write_text(AR2_LJ)
    out = _atomforge(
        "run", str(structure), "--engine", "lammps", "--kind", "singlepoint",
        "-o", "pair_style=lj/cut 4.0", "-o", 'pair_coeff=["* * 1e308 3.4"]',
        home=tmp_path / "home",
    )  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "atomforge: error: Flow run encountered an exception: EngineError: "
        "ar2: failed: lammps finished but returned a non-finite energy (nan)"
    )


def test_binary_file_symlink_loop_folder_for_run_and_results_root_file_are_one_line(tmp_path):
    (tmp_path / "a.xyz").symlink_to(tmp_path / "b.xyz")
    (tmp_path / "b.xyz").symlink_to(tmp_path / "a.xyz")
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("one", "two"):
        (folder / f"{name}.xyz").write_text(WATER_XYZ)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "bin.xyz").write_bytes(bytes(range(160, 256)))
    cases = [
        (["run", str(tmp_path / "bin.xyz")], {}, "not a text structure file (binary content)"),
        (["run", str(tmp_path / "a.xyz")], {}, "a symbolic link loop"),
        (["run", str(folder)], {}, "run takes one structure, found 2: use screen"),
        (
            ["run", str(folder / "one.xyz")],
            {"ATOMFORGE_RESULTS_ROOT": str(blocker)},
            "cannot be made",
        ),
    ]
    for args, env, message in cases:
        os.environ.update(env)
        try:
            out = _atomforge(*args, home=tmp_path / "home")
        finally:
            for name in env:
                os.environ.pop(name)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr


def test_screen_skip_invalid_reports_an_empty_file_and_computes_the_rest(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "water.xyz").write_text(WATER_XYZ)
    (folder / "empty.xyz").write_text("")
    out = _atomforge(
        "screen", str(folder), "--kind", "singlepoint", "--skip-invalid", home=tmp_path / "h"
    )
    assert out.returncode == 1, out.stderr
    assert "1 of 2 completed" in out.stdout
    assert "structure file is empty" in out.stdout


def test_screen_on_a_terminal_draws_a_progress_bar_and_not_elsewhere(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.xyz").write_text(WATER_XYZ)
    typescript = tmp_path / "terminal.out"
    command = f"{ATOMFORGE} screen {folder} --kind singlepoint"
    env = os.environ.copy() | {"ATOMFORGE_HOME": str(tmp_path / "home"), "COLUMNS": "160"}
    subprocess.run(
        ["script", "-qec", command, str(typescript)],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=300,
        check=True,
    )
    drawn = typescript.read_text(errors="replace")
    assert "2/2" in drawn and ("a: completed" in drawn or "b: completed" in drawn)
    piped = _atomforge("screen", str(folder), "--kind", "singlepoint", home=tmp_path / "home2")
    assert "2/2" not in piped.stderr


def test_a_home_given_with_a_tilde_is_under_the_users_home(tmp_path):
    """``ATOMFORGE_HOME=~/forge`` (the form of the default, ``~/.atomforge``) is a folder of
    the user's home: a command on the embedded server writes its files there, and no folder
    named ``~`` appears where the command was run."""
    from atomforge.deployments.api_trust import FILE_NAME, VARIABLE

    user_home, cwd = tmp_path / "user", tmp_path / "cwd"
    user_home.mkdir()
    cwd.mkdir()
    env = os.environ | {"HOME": str(user_home), "ATOMFORGE_HOME": "~/forge"}
    env.pop(VARIABLE, None)
    out = run_atomforge(env, "run", "-", "--kind", "singlepoint", stdin=WATER_XYZ, cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert not (cwd / "~").exists()
    assert (user_home / "forge" / FILE_NAME).is_file()
    assert any((user_home / "forge" / "results").iterdir())
