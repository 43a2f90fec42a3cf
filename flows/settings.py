"""atomforge's configuration, read from ``ATOMFORGE_*`` environment variables."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KeepWorkdir(str, Enum):
    """When to keep a structure's working directory after its run."""

    always = "always"
    on_failure = "on_failure"
    never = "never"


class Settings(BaseSettings):
    """Where atomforge keeps files and how it reaches Dask; each field is ``ATOMFORGE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="ATOMFORGE_", env_file=".env", extra="ignore", frozen=True
    )

    home: Path = Field(
        Path("~/.atomforge"), description="Default parent of work_root and results_root."
    )
    work_root: Path | None = Field(None, description="Per-run working directories live here.")
    results_root: Path | None = Field(None, description="JSON result documents live here.")
    inbox_dir: Path | None = Field(
        None,
        description="The inbox that screen-inbox screens (default <home>/inbox): files "
        "dropped in it are claimed, computed and moved to its done/ or failed/.",
    )
    keep_workdir: KeepWorkdir = Field(
        KeepWorkdir.always, description="Keep working directories: always, on_failure, never."
    )
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786."
    )
    dask_cluster_class: str | None = Field(
        None, description="Dask cluster class to start instead, e.g. dask_jobqueue.SLURMCluster."
    )
    dask_cluster_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for that cluster class (JSON)."
    )
    dask_adapt_max: int | None = Field(
        None, ge=1, description="Scale the cluster adaptively up to this many workers."
    )
    dask_workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="Local cluster workers."
    )
    dask_processes: bool = Field(
        False,
        description="Local cluster workers as processes (engines always run as their own "
        "processes, so threads are enough and start faster).",
    )
    dask_profile: bool = Field(
        False,
        description="Run Dask's statistical profiler in local workers (it samples every "
        "worker thread every 10 ms, CPU the engines would otherwise have).",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="About this many structures per task in a screen; default: one chunk "
        "per Dask worker thread.",
    )
    engine_log_chars: int = Field(
        0,
        ge=0,
        description="Most characters of engine output a run-engine task sends to the run "
        "logs per second (the latest lines are kept; 0, the default, sends none: a failed "
        "structure's last lines are logged with its failure). The working directories "
        "keep the complete output.",
    )
    failure_log_lines: int = Field(
        20, ge=0, description="Last lines of a failed structure's engine output in the log."
    )
    retries: int = Field(3, ge=0, description="Retries of a step that failed for a passing reason.")
    retry_backoff_seconds: float = Field(2.0, ge=0, description="First retry delay; doubles.")
    retry_jitter: float = Field(0.5, ge=0, description="Random jitter factor on retry delays.")
    max_corrections: int = Field(
        3,
        ge=0,
        description="Most corrections the engines' error handlers make to one structure "
        "before it fails with the whole story.",
    )
    reuse: bool = Field(
        True,
        description="Reuse stored completed results whose inputs are identical, unless a "
        "run says otherwise (its options.reuse).",
    )
    index_url: str | None = Field(
        None,
        description="PostgreSQL URL of the result index (postgresql://user:password@host/db), "
        "shared by every machine that writes to one results folder; default: SQLite "
        "index.sqlite in the results folder.",
    )
    terminal_progress: bool = Field(
        False,
        description="Draw a progress bar on the terminal (the atomforge command turns it "
        "on when its standard error is a terminal).",
    )
    partial_table_seconds: float = Field(
        10.0,
        ge=0,
        description="A run that lasts longer than this shows the results parsed so far as "
        "a table artifact (<flow>-partial), updated at most once per this many seconds; "
        "0 turns it off.",
    )
    table_rows: int = Field(
        1000,
        ge=1,
        description="Most rows a results table artifact shows: a ranked table its first, a "
        "table of the results so far the latest. Every result keeps its document "
        "(atomforge results --run).",
    )
    plots: bool = Field(
        True,
        description="Draw a run's plots (a screen's ranking, an optimization's energy, an "
        "MD run's temperature and energy) as PNG files in its results folder and in its "
        "artifacts.",
    )
    max_failed_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A screen whose structures that did not complete are more than this "
        "fraction of those it computed ends Failed (its state message counts completed "
        "and failed either way; a run's options.max_failed_fraction wins); invalid "
        "structures set aside with skip_invalid do not count.",
    )
    cores_limit: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$",
        description="Name of a limit counting the cores engines use across all runs on "
        "this host (the service command sets 'atomforge-cores' for its runs): each "
        "run-engine task holds its engine's cores' worth of the host's cores while it "
        "runs, as lock files the system frees when a process ends, however it ends.",
    )
    cores_lock_dir: Path | None = Field(
        None,
        description="Where the cores limits keep their lock files: a folder on this host "
        "(default: atomforge-cores-<uid> in the temporary folder).",
    )
    min_distance: float = Field(0.5, gt=0, description="Closer atoms (A) count as overlapping.")
    input_roots: list[Path] | None = Field(
        None,
        description="Folders a run may read structure files from (JSON list); a path "
        "outside them, also through a link, is refused before it is read. Default: the "
        "atomforge home (with the inbox) and the process's working directory; the "
        "atomforge command reads whatever its user names.",
    )
    max_input_mb: float = Field(
        100.0, gt=0, description="Structure files larger than this (MB) are refused unread."
    )

    def resolved_work_root(self) -> Path:
        """Return the absolute work root, creating it if needed."""
        root = (self.work_root or self.home / "work").expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root

    def resolved_inbox_dir(self) -> Path:
        """Return the absolute inbox folder (created by the run that uses it)."""
        return (self.inbox_dir or self.home / "inbox").expanduser().resolve()

    def resolved_input_roots(self) -> list[Path]:
        """Return the absolute folders structure files may be read from."""
        roots = self.input_roots or [self.home, self.resolved_inbox_dir(), Path.cwd()]
        return [root.expanduser().resolve() for root in roots]

    def resolved_results_root(self) -> Path:
        """Return the absolute results root, creating it if needed."""
        root = (self.results_root or self.home / "results").expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root


_read: tuple[tuple, Settings] | None = None


def get_settings() -> Settings:
    """Return the settings as the environment and ``.env`` say now: the same (frozen)
    object while neither has changed. Reading them anew costs about 1.5 ms, and a screen
    asked about ten times."""
    global _read
    key = _sources_key()
    if _read is None or _read[0] != key:
        _read = (key, Settings())
    return _read[1]


def _sources_key() -> tuple:
    """Return what the settings are read from: the ``ATOMFORGE_*`` variables and the
    ``.env`` file of the working directory (its path, size and modification time)."""
    variables = tuple(
        sorted(item for item in os.environ.items() if item[0][:10].upper() == "ATOMFORGE_")
    )
    dotenv = Path(".env").absolute()
    try:
        stat = dotenv.stat()
    except OSError:
        return variables, str(dotenv)
    return variables, str(dotenv), stat.st_size, stat.st_mtime_ns
