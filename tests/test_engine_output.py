"""Engine output reaches its log file and the line splitter whole, however it arrives."""

from __future__ import annotations

from pathlib import Path

from atomforge.engines.process import LineSplitter, run_process


def test_line_splitter_passes_whole_lines_from_arbitrary_blocks():
    lines: list[str] = []
    splitter = LineSplitter(lines.append)
    for block in ["fir", "st\nsec", "ond\n\nthi", "rd"]:
        splitter(block)
    assert lines == ["first", "second", ""]
    splitter.close()
    assert lines == ["first", "second", "", "third"]


def test_process_output_goes_to_the_log_file_and_the_sink(tmp_path: Path):
    received: list[str] = []
    script = "for i in $(seq 1 2000); do echo line $i; done; echo done >&2"
    outcome = run_process(
        ["sh", "-c", script],
        cwd=tmp_path,
        timeout=30,
        pid_dir=tmp_path / "pids",
        stop_file=tmp_path / "stop",
        log=received.append,
        log_name="out.log",
    )
    assert outcome.returncode == 0
    text = "".join(received)
    assert text == (tmp_path / "out.log").read_text()
    assert text.splitlines()[0] == "line 1" and text.splitlines()[-1] == "done"
    assert len(text.splitlines()) == 2001
    assert not list((tmp_path / "pids").glob("*.json"))
