"""The local server: a Prefect server and a warm command process, started once, reused.

A fresh ``atomforge run`` would spend about 5 s starting Prefect's embedded server and
3 s importing Prefect, ASE and Dask before it computes anything. Instead the first
command that runs a flow starts, in the background, one process per atomforge home
(``ATOMFORGE_HOME/server``) that

- runs ``prefect server start`` on 127.0.0.1 (the UI shows every run) with its own
  Prefect home and database under ``ATOMFORGE_HOME/server/prefect``;
- imports the flows once, then serves commands on a Unix socket: for each it forks a
  child that takes over the caller's terminal (its stdin, stdout and stderr are passed
  over the socket), working directory, environment and arguments, runs the command
  against that server, and reports the exit code. The caller forwards Ctrl-C to it; a
  child whose caller goes away (``kill -9``) cancels its run as Ctrl-C does.

Later commands find it through ``server.json`` (pid, port, API URL), which a lock keeps
single when two commands start at once; a stale one (its process gone) is replaced. The
process stops itself after ``ATOMFORGE_LOCAL_SERVER_IDLE_MINUTES`` without a command, and
is replaced when atomforge's code changed since it started. Nothing of this happens when
``PREFECT_API_URL`` is set (in the environment or the active Prefect profile): commands
use that API. ``ATOMFORGE_LOCAL_SERVER=false`` keeps the embedded server per command (the
default inside a pytest run).

This module imports the standard library only: it is what a command imports first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from importlib import import_module
from pathlib import Path

import tomllib

from atomforge.deployments.api_trust import trust_plain_http
from atomforge.deployments.warm_client import (
    read_line,
    recv_request,
    same_user,
    send_line,
    send_request,
    standard_fds,
)
from atomforge.engines.reaper import stat_fields
from atomforge.flows import database_template

FLOW_COMMANDS = frozenset({"run", "screen", "workflow", "demo"})
"""The commands that run flows: these go to the local server."""
PACKAGE = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 180.0
"""How long a command waits for a starting server (a new database takes ~15 s to create)."""
HEALTH_POLL_SECONDS = 0.05
DRAIN_SECONDS = 10.0
"""How long a command's process waits at its end for its logs and events to reach the
server."""
MARKER = "atomforge.flows.local_server"
"""What the server's command line holds: a recorded pid running anything else is stale."""


def _flag(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, default).strip().lower()


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Return whether commands use the local server: ``ATOMFORGE_LOCAL_SERVER`` true (the
    default); never when a Prefect API is configured."""
    if _flag(env, "ATOMFORGE_LOCAL_SERVER", "true") in {"false", "0", "no", "off"}:
        return False
    return not configured_api_url(env)


def configured_api_url(env: Mapping[str, str] = os.environ) -> str | None:
    """Return the Prefect API URL the environment or the active Prefect profile sets."""
    if env.get("PREFECT_API_URL"):
        return env["PREFECT_API_URL"]
    prefect_home = Path(env.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles = Path(env.get("PREFECT_PROFILES_PATH", prefect_home / "profiles.toml"))
    try:
        data = tomllib.loads(profiles.expanduser().read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = env.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return (data.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL") or None


def home(env: Mapping[str, str] = os.environ) -> Path:
    """Return the local server's folder under the atomforge home."""
    root = Path(env.get("ATOMFORGE_HOME", "~/.atomforge")).expanduser().resolve()
    return root / "server"


def idle_seconds(env: Mapping[str, str] = os.environ) -> float:
    """Return how long the server waits for a command before it stops itself."""
    return 60 * float(env.get("ATOMFORGE_LOCAL_SERVER_IDLE_MINUTES", "60"))


def code_stamp() -> str:
    """Return a digest of the Python running atomforge and its source files' times: a
    local server, warm executor or batcher started from other code is replaced."""
    digest = hashlib.sha256(sys.executable.encode())
    for folder in ("flows", "engines", "deployments"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            digest.update(f"{path}:{path.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def prefect_env(env: Mapping[str, str]) -> dict[str, str]:
    """Return the ``PREFECT_*`` settings a warm process was started with (Prefect reads
    them once, at import): a command with other ones runs in its own process."""
    return {
        key: value
        for key, value in env.items()
        if key.startswith("PREFECT_") and key not in {"PREFECT_API_URL", "PREFECT_HOME"}
    }


@dataclass
class ServerState:
    """What ``server.json`` records about a running local server."""

    pid: int
    port: int
    api_url: str
    socket: str
    stamp: str
    prefect_env: dict[str, str]
    started: float

    @classmethod
    def load(cls, folder: Path) -> ServerState | None:
        """Return the recorded state, or None if there is none or it is unreadable."""
        try:
            return cls(**json.loads((folder / "server.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, folder: Path) -> None:
        """Write the state atomically."""
        tmp = folder / "server.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(folder / "server.json")

    def alive(self) -> bool:
        """Return whether the recorded process is a running local server (or one being
        started: right after ``Popen`` returns, the kernel may not have set the new
        program's arguments yet, and its command line reads empty)."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return MARKER.encode() in cmdline or (not cmdline and _exists(self.pid))

    def healthy(self, timeout: float = 2.0) -> bool:
        """Return whether the Prefect API answers its health check."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=timeout) as answer:
                return answer.status == 200
        except OSError:
            return False


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock: one command at a time checks, starts or stops the server."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _socket_name(folder: Path) -> str:
    """Return the abstract socket name of the server of ``folder`` (peers are checked)."""
    return f"atomforge-{os.getuid()}-{hashlib.sha256(str(folder).encode()).hexdigest()[:20]}"


def ensure(env: Mapping[str, str] = os.environ) -> ServerState:
    """Return the running local server of this atomforge home, starting it if needed."""
    folder = home(env)
    stamp = code_stamp()
    with _locked(folder):
        state = ServerState.load(folder)
        if state is not None and state.alive() and state.stamp == stamp:
            return state
        if state is not None:
            _stop(folder, state)
        return _start(folder, env, stamp)


def _start(folder: Path, env: Mapping[str, str], stamp: str) -> ServerState:
    """Start the server process detached (a session of its own); record and return it.
    Its numerical libraries run one thread unless ``env`` says otherwise
    (``OMP_NUM_THREADS``; each engine sets its own threads), as an ASE runner of one core
    does, so that a command's child may fork its runner zygote from itself (see
    :func:`atomforge.engines.warm_runner.prewarm`)."""
    port = int(env.get("ATOMFORGE_LOCAL_SERVER_PORT", "0")) or _free_port()
    log = (folder / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", MARKER, "serve", str(port)],
        env={"OMP_NUM_THREADS": "1", **env, "ATOMFORGE_HOME": str(folder.parent)},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    state = ServerState(
        pid=process.pid,
        port=port,
        api_url=f"http://127.0.0.1:{port}/api",
        socket=_socket_name(folder),
        stamp=stamp,
        prefect_env=prefect_env(env),
        started=time.time(),
    )
    state.save(folder)
    return state


def _stop(folder: Path, state: ServerState, timeout: float = 20.0) -> bool:
    """Stop the recorded server's process group (its Prefect server and commands too)
    and forget it; return whether it ran."""
    running = state.alive()
    if running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_members(state.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_members(state.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state.pid, signal.SIGKILL)
    (folder / "server.json").unlink(missing_ok=True)
    return running


def _group_members(pgid: int) -> list[int]:
    """Return the live processes (not zombies) of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _live_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _live_stat(pid: int) -> list[str] | None:
    """Return the fields of ``/proc/PID/stat`` after the command name (state, parent,
    process group...), or None if process ``pid`` does not exist or is a zombie."""
    fields = stat_fields(pid)
    return fields if fields is not None and fields[0] != "Z" else None


def stop(env: Mapping[str, str] = os.environ) -> bool:
    """Stop this atomforge home's local server; return whether one was running."""
    folder = home(env)
    with _locked(folder):
        state = ServerState.load(folder)
        return state is not None and _stop(folder, state)


def status(env: Mapping[str, str] = os.environ) -> tuple[ServerState | None, str]:
    """Return the recorded server (None if none runs) and one line about it."""
    folder = home(env)
    state = ServerState.load(folder)
    if state is None:
        return None, f"no local server ({folder})"
    if not state.alive():
        return None, f"no local server ({folder}: stale record of pid {state.pid})"
    health = "healthy" if state.healthy() else "starting"
    minutes = (time.time() - state.started) / 60
    return state, (
        f"local server pid {state.pid}, {health}, up {minutes:.0f} min; "
        f"UI and API at http://127.0.0.1:{state.port} ({folder})"
    )


def prepare(env: Mapping[str, str] = os.environ) -> Path:
    """Return the database that new homes' local servers start from for the installed
    Prefect, building it first unless one is kept with the installed collections' block
    types (a throwaway home's server runs Prefect's migrations and registers its block
    types, about 15 s, then stops): so that not even the first command on a machine
    waits for that. RuntimeError if it cannot."""
    from importlib.metadata import version

    prefect_version = version("prefect")
    kept = database_template.template(prefect_version, env)
    stamp = database_template.block_types_stamp(prefect_version)
    if kept.exists() and database_template.kept_block_types(prefect_version, env) == stamp:
        return kept
    if not database_template.applies(env):
        raise RuntimeError("a PREFECT_*_DATABASE_* setting names another database: none to build")
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        database_template.discard(prefect_version, env)
    except OSError as exc:
        raise RuntimeError(f"cannot write {kept.parent}: {exc.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="atomforge-prepare-") as scratch:
        throwaway = {**env, "ATOMFORGE_HOME": scratch}
        for name in ("PREFECT_API_URL", "ATOMFORGE_LOCAL_SERVER_PORT"):
            throwaway.pop(name, None)
        state = ensure(throwaway)
        try:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while not kept.exists():
                if not state.alive() or time.monotonic() > deadline:
                    why = "timed out" if state.alive() else f"server pid {state.pid} ended"
                    log = home(throwaway) / "server.log"
                    raise RuntimeError(f"no database was kept ({why}): {_last_line(log)}")
                time.sleep(HEALTH_POLL_SECONDS)
        finally:
            _stop(home(throwaway), state)
    return kept


def _last_line(path: Path) -> str:
    """Return the last line of the text file ``path`` (empty if there is none)."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


# --- the command side ----------------------------------------------------------------


def _connect(state: ServerState, timeout: float) -> socket.socket:
    """Return a connection to the server's command socket, waiting while it starts."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect("\0" + state.socket)
            return sock
        except OSError:
            sock.close()
            if not _exists(state.pid) or time.monotonic() > deadline:
                raise
            time.sleep(HEALTH_POLL_SECONDS)


def _exists(pid: int) -> bool:
    """Return whether process ``pid`` exists (and is not a zombie)."""
    return _live_stat(pid) is not None


def forward(argv: list[str], env: Mapping[str, str] = os.environ) -> int | None:
    """Run the command ``argv`` in the local server; return its exit code.

    Returns None, having run nothing, when this command's Prefect settings differ from
    those the server was started with: the caller then runs it itself against
    ``PREFECT_API_URL`` (which this sets to the local server's API).
    """
    state = ensure(env)
    if prefect_env(env) != state.prefect_env:
        os.environ["PREFECT_API_URL"] = state.api_url
        wait_healthy(state)
        return None
    sock = _connect(state, START_TIMEOUT_SECONDS)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(env)}
    send_request(sock, request, standard_fds())
    buffer = bytearray()
    started = read_line(sock, buffer)
    if started is None:
        log = home(env) / "server.log"
        print(f"atomforge: error: the local server ended; see {log}", file=sys.stderr)
        return 1
    child = started["pid"]

    def relay(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, relay)
    finished = read_line(sock, buffer)
    if finished is None:
        print("atomforge: error: the command's process ended without an exit code", file=sys.stderr)
        return 1
    return int(finished["exit"])


def wait_healthy(state: ServerState, timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Return once the server's Prefect API answers (RuntimeError if it stops or times out)."""
    deadline = time.monotonic() + timeout
    while not state.healthy(timeout=1.0):
        if not state.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the local Prefect server did not start; see {home()}/server.log")
        time.sleep(HEALTH_POLL_SECONDS)


# --- the server side -----------------------------------------------------------------


CALLER_GONE = "the atomforge command went away"


def _end_with_caller(conn: socket.socket) -> None:
    """Interrupt this process, as Ctrl-C does, once the caller at the other end of ``conn``
    is gone (it sends nothing after its request: the connection ends with it)."""

    def wait() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1):
                continue
        from atomforge.flows import interrupt

        interrupt.interrupt(CALLER_GONE)

    threading.Thread(target=wait, name="caller-watch", daemon=True).start()


_command_child = False


def in_command_child() -> bool:
    """Return whether this process is a command's child forked by the local server."""
    return _command_child


def _child(conn: socket.socket, request: dict, fds: list[int], api_url: str) -> None:
    """Run one command in this forked process as its caller would have; never returns."""
    code = 1
    try:
        import_module(__spec__.name)._command_child = True  # this file also runs as __main__
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setpgid(0, 0)
        send_line(conn, {"pid": os.getpid()})
        _end_with_caller(conn)
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"], PREFECT_API_URL=api_url)
        trust_plain_http(os.environ, home())
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
        sys.argv = ["atomforge", *request["argv"]]
        sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())
        from atomforge.flows.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("atomforge: interrupted", file=sys.stderr)
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            send_held_telemetry(DRAIN_SECONDS)
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            send_line(conn, {"exit": code})
        os._exit(code if isinstance(code, int) else 1)


def send_held_telemetry(timeout: float) -> None:
    """Send what Prefect's background services still hold in a process about to end with
    ``os._exit`` (an interpreter's exit would): a run's logs and the events of its last
    task runs, waiting at most ``timeout`` seconds. Returns nothing."""
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=timeout)


WARM_MODULES = (
    "atomforge.flows.cli",
    "atomforge.flows.simulate",
    "atomforge.flows.screen",
    "atomforge.flows.workflow",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.concurrency.v1",
    "prefect.utilities.visualization",
    "prefect._internal.attempt_control",
    "prefect._internal.control_listener",
    "prefect._internal.metrics",
    "fastapi.encoders",
    "starlette.staticfiles",
    "anyio._backends._asyncio",
    "opentelemetry.metrics",
    "opentelemetry._logs",
    "distributed.http.scheduler",
    "distributed.http.worker",
    "distributed.http.proxy",
    "distributed.http.statics",
    "distributed.http.health",
    "distributed.http.prometheus",
    "distributed.diagnostics.websocket",
    "tornado.platform.asyncio",
    "pydantic.color",
    "rich._emoji_codes",
    "ase.io.extxyz",
)
"""What commands import, found by listing the modules a first ``run`` of water imports
after the flows (about 0.3 s): a forked child finds them imported."""


def _warm_up() -> None:
    """Import what commands use and draw a plot, so that each forked child starts with
    them (a failing import is left to the commands, which meet it again and report it)."""
    for name in WARM_MODULES:
        try:
            import_module(name)
        except Exception as exc:
            print(f"warm-up: import {name} failed: {type(exc).__name__}: {exc}", flush=True)
    with contextlib.suppress(Exception):
        import_module("atomforge.flows.cli").build_parser()
    with contextlib.suppress(Exception):  # the commands draw their plots or log why not
        import_module("atomforge.flows.ui.plots").warm_up_drawing()
    if threading.active_count() > 1:
        print(f"warm-up left threads running: {threading.enumerate()}", flush=True)


UNUSED_SERVICES = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "PAUSE_EXPIRATIONS",
    "TRIGGERS",
    "REPOSSESSOR",
)
"""Prefect server services commands do not use (deployment schedules, work pools and
workers, automations): off, a start is about a second shorter. The service command's
server (``atomforge service up``) runs them for deployments."""


def _prefect_server(folder: Path, port: int, block_types: str) -> None:
    """Run the Prefect server (API and UI) in this forked process until it is stopped.

    The database is migrated on the first start of each Prefect version only (checking
    an up-to-date database costs a start time), block types are registered only when
    ``block_types`` (the installed Prefect and collections) differ from those that last
    registered them (finding them loads every collection), and services that commands do
    not use stay off unless the environment turns them on.
    """
    code = 1
    try:
        import prefect

        prefect_home = folder / "prefect"
        if database_template.applies():
            records = database_template
            if records.read_record(prefect_home, records.MIGRATED_BY) == prefect.__version__:
                os.environ["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"
            registered = records.read_record(prefect_home, records.BLOCK_TYPES_BY)
            if registered == block_types and not records.registration_set():
                for name in records.BLOCK_REGISTRATION_SETTINGS:
                    os.environ[name] = "false"
                print(f"block types already registered by {block_types}", flush=True)
        for name in UNUSED_SERVICES:
            os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{name}_ENABLED", "false")
        os.environ.update(
            PREFECT_HOME=str(folder / "prefect"),
            PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
        import uvicorn
        from prefect.server.api.server import create_app

        uvicorn.run(create_app(final=True), host="127.0.0.1", port=port, log_level="warning")
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _record_database(
    prefect_home: Path, version: str, block_types: str, default_database: bool
) -> str | None:
    """Record that the running server migrated its default database with Prefect
    ``version`` and registered ``block_types`` in it (unless the environment set how it
    registers them); return the block types stamp recorded, or None."""
    if not default_database:
        return None
    records = database_template
    records.write_record(prefect_home, records.MIGRATED_BY, version)
    if records.registration_set():
        return None
    records.write_record(prefect_home, records.BLOCK_TYPES_BY, block_types)
    return block_types


def serve(port: int) -> int:
    """Run the local server of ``ATOMFORGE_HOME`` on ``port`` until idle, stopped or
    replaced: the Prefect server and each command in a forked child.

    Prefect is imported once, before the Prefect server's process forks off, and the rest
    of what commands use while that server starts. A new home's database is copied from
    the one kept by the first local server of this Prefect version, if there is one (see
    :mod:`atomforge.flows.database_template`); the first keeps its own, with the record of
    the block types registered in it.
    """
    folder = home()
    (folder / "prefect").mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + _socket_name(folder))
    listener.listen(64)
    api_url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = api_url
    trust_plain_http(os.environ, folder)
    began = time.monotonic()
    import prefect

    version = prefect.__version__
    block_types = database_template.block_types_stamp(version)
    prefect_home = folder / "prefect"
    database = prefect_home / database_template.DATABASE_FILE
    default_database = database_template.applies()
    new_database = default_database and not database.exists()
    if new_database:
        database_template.forget_records(prefect_home)  # left by a database removed by hand
    if new_database and database_template.seed(database, version):
        database_template.write_record(prefect_home, database_template.MIGRATED_BY, version)
        if database_template.kept_block_types(version) == block_types:
            database_template.write_record(
                prefect_home, database_template.BLOCK_TYPES_BY, block_types
            )
        print(f"database copied from {database_template.template(version)}", flush=True)
        new_database = False
    server = os.fork()
    if server == 0:
        listener.close()
        _prefect_server(folder, port, block_types)
    try:
        _warm_up()
        warmed = time.monotonic() - began
        probe = ServerState(os.getpid(), port, api_url, _socket_name(folder), "", {}, time.time())
        try:
            wait_healthy(probe)
        except RuntimeError as exc:
            print(exc, flush=True)
            return 1
        registered = _record_database(prefect_home, version, block_types, default_database)
        if new_database and (kept := database_template.keep(database, version, registered)):
            print(f"database kept for new local servers: {kept}", flush=True)
        print(
            f"local server ready: API {api_url}, pid {os.getpid()}; imports took "
            f"{warmed:.1f} s, the API answered after {time.monotonic() - began:.1f} s",
            flush=True,
        )
        return _serve_commands(folder, listener, server, api_url)
    finally:
        listener.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _exists(server) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(server, os.WNOHANG)
            time.sleep(0.05)


def _serve_commands(folder: Path, listener: socket.socket, server: int, api_url: str) -> int:
    """Run each command that comes in a forked child until idle, stopped or replaced."""
    listener.settimeout(5.0)
    idle = idle_seconds()
    last = time.monotonic()
    children: set[int] = set()
    while True:
        while True:
            pid = 0
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            if pid == server:
                print("the Prefect server stopped; stopping", flush=True)
                return 1
            children.discard(pid)
            last = time.monotonic()
        current = ServerState.load(folder)
        if current is None or current.pid != os.getpid():
            print("no longer the recorded server; stopping", flush=True)
            return 0
        if not children and time.monotonic() - last > idle:
            print(f"idle for {idle / 60:.0f} min; stopping", flush=True)
            with _locked(folder):
                (folder / "server.json").unlink(missing_ok=True)
            return 0
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            if not same_user(conn):
                continue
            try:
                request, fds = recv_request(conn)
            except (OSError, ValueError) as exc:
                print(f"refused a request: {exc}", flush=True)
                continue
            last = time.monotonic()
            pid = os.fork()
            if pid == 0:
                listener.close()
                _child(conn, request, fds, api_url)
            children.add(pid)
            for fd in fds:
                os.close(fd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve(int(sys.argv[2])))
    sys.exit(f"usage: python -m {MARKER} serve PORT")
