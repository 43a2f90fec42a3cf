"""Where a flow run works: its job folders, and the control folder its hooks use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from atomforge.engines.errors import InputError
from atomforge.flows.settings import Settings

CONTROL_DIR = ".control"


@dataclass(frozen=True)
class RunPaths:
    """The folders of one flow run."""

    work_dir: Path
    control_dir: Path

    @property
    def pid_dir(self) -> Path:
        """Return the folder where engine processes record their pids."""
        return self.control_dir / "pids"

    @property
    def stop_file(self) -> Path:
        """Return the file whose existence tells every engine of this run to stop."""
        return self.control_dir / "stop"

    @property
    def plan_file(self) -> Path:
        """Return the file listing the run's structures (as ``not-started`` documents),
        written before any engine starts: what a hook or a retry settles or resumes."""
        return self.control_dir / "plan.json"


def writable_roots(settings: Settings) -> tuple[Path, Path]:
    """Return the work and results roots, made if needed; raise InputError (one line)
    if either cannot be made or written, so that no engine runs for results that
    could not be stored."""
    roots = []
    for name, resolve in (
        ("work root", settings.resolved_work_root),
        ("results root", settings.resolved_results_root),
    ):
        try:
            root = resolve()
        except OSError as exc:
            raise InputError(f"{name} {exc.filename}: cannot be made: {exc.strerror}") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise InputError(f"{name} {root}: cannot be written")
        roots.append(root)
    return roots[0], roots[1]


def run_paths(settings: Settings, flow_run_id: str, run_dir: str | None = None) -> RunPaths:
    """Return the folders of a flow run; raise InputError if ``run_dir`` escapes the work root."""
    root = settings.resolved_work_root()
    work_dir = (root / (run_dir or flow_run_id)).resolve()
    if not work_dir.is_relative_to(root) or work_dir == root:
        raise InputError(f"run_dir {run_dir!r} escapes the work root {root}")
    if work_dir.is_relative_to(root / CONTROL_DIR):
        raise InputError(f"run_dir {run_dir!r} is reserved")
    return RunPaths(work_dir=work_dir, control_dir=root / CONTROL_DIR / flow_run_id)
