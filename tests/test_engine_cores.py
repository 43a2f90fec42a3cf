"""Engine processes use the cores a structure is given: one OpenMP thread each by default."""

from __future__ import annotations

from pathlib import Path

from atomforge.engines import get_engine, make_parameters


def test_engine_processes_default_to_one_openmp_thread():
    for name in ("xtb", "tblite", "emt"):
        command = get_engine(name).command(make_parameters(name), [Path("job")])
        assert command.env["OMP_NUM_THREADS"] == "1"


def test_openmp_threads_follow_the_cores_parameter():
    for name in ("xtb", "tblite"):
        command = get_engine(name).command(make_parameters(name, cores=2), [Path("job")])
        assert command.env["OMP_NUM_THREADS"] == "2"
