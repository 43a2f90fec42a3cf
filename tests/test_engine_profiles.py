"""Engine processes get one OpenMP thread each by default: one runs per Dask worker thread."""

from __future__ import annotations

from atomforge.engines.ase_engine import AseRunnerProfile
from atomforge.engines.xtb import XtbProfile


def test_engine_processes_default_to_one_openmp_thread():
    assert AseRunnerProfile().env()["OMP_NUM_THREADS"] == "1"
    assert XtbProfile().env()["OMP_NUM_THREADS"] == "1"


def test_openmp_threads_follow_the_settings(monkeypatch):
    monkeypatch.setenv("ATOMFORGE_ASE_OMP_THREADS", "4")
    monkeypatch.setenv("ATOMFORGE_XTB_OMP_THREADS", "3")
    assert AseRunnerProfile().env()["OMP_NUM_THREADS"] == "4"
    assert XtbProfile().env()["OMP_NUM_THREADS"] == "3"
