"""atomforge as a service on one Debian machine: PostgreSQL, the Prefect server on it with
auth, the work pool with its priority queues and the deployments, and a process worker.

``python -m atomforge.deployments.service up|status|down|env`` (also ``atomforge service``).
``up`` starts what is not running, in that order, and is safe to run again; ``status``
reports each part and exits 1 if one is down; ``down`` stops them in reverse order; ``env``
prints the two variables a client (``prefect``, ``atomforge``, a second worker) needs.
Everything lives in ``ATOMFORGE_SERVICE_DIR``: PostgreSQL's data folder, the generated
passwords (mode 600), pid files, logs and the warm executor's socket.

The worker's runs start in the warm executor (:mod:`atomforge.deployments.warm_exec`),
which this command starts with the worker and stops with it: the pool's job template runs
:mod:`atomforge.deployments.warm_client` instead of ``python -m prefect.engine``.

Batching (``ATOMFORGE_SERVICE_BATCH``, on by default): ``up`` also creates the
``atomforge-batch`` pool, which no process worker polls, the deployment
``simulate/batched`` on it (a copy of ``simulate/simulate``: same flow and form), and
starts the batcher (:mod:`atomforge.deployments.batcher`), which computes that pool's
requests together; it is part of the worker in ``status`` and ``down``.
"""

from __future__ import annotations

import argparse
import base64
import glob
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atomforge.deployments import warm_client, warm_exec
from atomforge.deployments.api_trust import unused_ca

REPO = Path(__file__).resolve().parents[1]
POOL = "atomforge-process"
CORES_LIMIT = "atomforge-cores"
"""The cores limit (of the host: :mod:`atomforge.flows.scheduling.cores`) the runs of the
service share."""
QUEUES = {"urgent": 1, "default": 2, "batch": 3}
"""The pool's queues and their Prefect priorities (1 is taken first): ``default`` is the
normal priority, the queue deployments submit to unless a run names another."""
PRIORITIES = {"urgent": "urgent", "normal": "default", "batch": "batch"}
"""A run's priority name, as the CLI takes it, and the queue it goes to."""
BATCH_POOL = "atomforge-batch"
"""The pool of the batched deployment: the batcher polls it, no process worker does."""
BATCH_DEPLOYMENT = ("simulate", "batched")
"""The batched deployment (flow, name): a copy of ``simulate/simulate`` on :data:`BATCH_POOL`."""
DEPLOYMENT_FIELDS = (
    "description",
    "tags",
    "parameters",
    "parameter_openapi_schema",
    "entrypoint",
    "path",
    "pull_steps",
    "version",
)
"""What the batched deployment copies from ``simulate/simulate``."""
DATABASE = "prefect"
DB_USER = "atomforge"
START_TIMEOUT_SECONDS = 120.0


def _default_dir() -> Path:
    """Return the default service folder: system-wide for root (PostgreSQL runs as its own
    user and must reach its data), else under the user's atomforge home."""
    if os.geteuid() == 0:
        return Path("/var/lib/atomforge")
    return Path(os.environ.get("ATOMFORGE_HOME", "~/.atomforge")).expanduser() / "service"


class ServiceSettings(BaseSettings):
    """Where the service lives and listens; each field is ``ATOMFORGE_SERVICE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="ATOMFORGE_SERVICE_", extra="ignore")

    dir: Path = Field(default_factory=_default_dir, description="Data, passwords, pids, logs.")
    host: str = Field("127.0.0.1", description="Address the Prefect server listens on.")
    port: int = Field(4200, description="Port of the Prefect server (API and UI).")
    postgres_port: int = Field(5433, description="Port of PostgreSQL, on 127.0.0.1 only.")
    worker_limit: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="Most flow runs at once in the pool (its concurrency limit).",
    )
    worker_health_port: int = Field(8080, description="Port of the worker's health check.")
    worker_query_seconds: float | None = Field(
        None,
        gt=0,
        description="How often the worker asks the server for runs to start "
        "(PREFECT_WORKER_QUERY_SECONDS; default 0.25 s, 5 s with the consumer, which "
        "then starts the runs first): a run waits half of it on average.",
    )
    consumer: bool = Field(
        True,
        description="Start the runs of atomforge's deployments in the warm consumer "
        "(no worker launch; the worker starts the runs that set job variables).",
    )
    consumer_poll_seconds: float = Field(
        0.2,
        gt=0,
        description="How often the consumer asks the server for runs to start in the "
        "seconds after the server announced one, and while it cannot hear the server.",
    )
    warm: bool = Field(
        True,
        description="Start runs in the warm executor (False: each run starts its own "
        "`python -m prefect.engine`).",
    )
    idle_poll_seconds: float = Field(
        2.0,
        gt=0,
        description="How often the consumer and the batcher ask the server for due runs "
        "when it announced none (they subscribe to its events of scheduled runs and ask at "
        "once when one comes; a run of a schedule becomes due without a word).",
    )
    batch: bool = Field(
        True,
        description="Serve the batched deployment (simulate/batched): its pool and the "
        "batcher, which computes its requests together.",
    )
    batch_window_seconds: float = Field(
        0.3,
        ge=0,
        description="How long the batcher collects requests after the first one before "
        "it computes them together.",
    )
    batch_max: int = Field(
        50,
        ge=1,
        le=50,
        description="Most requests in one batch (the server changes the state of at most "
        "50 runs in one call; 100 water requests at once: 3.4-3.7 a second with 50, "
        "3.3-3.4 with 32).",
    )
    batch_poll_seconds: float = Field(
        0.2,
        gt=0,
        description="How often the batcher asks the server for new requests in the seconds "
        "after it announced one, while requests wait for their batch, and while it cannot "
        "hear the server.",
    )
    batch_concurrency: int = Field(
        2, ge=1, description="Most batches computing at once (the next one is collected meanwhile)."
    )

    @property
    def api_url(self) -> str:
        """Return the Prefect API's URL."""
        return f"http://{self.host}:{self.port}/api"


@dataclass(frozen=True)
class Part:
    """One part of the service and whether it is up, with a word on its state."""

    name: str
    up: bool
    detail: str


class ServiceError(RuntimeError):
    """A part of the service could not be started."""


def _secret(settings: ServiceSettings, name: str) -> str:
    """Return the secret stored as ``name`` in the service folder, made on first use."""
    path = settings.dir / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def auth_string(settings: ServiceSettings) -> str:
    """Return the ``user:password`` the Prefect server requires of every client."""
    return f"admin:{_secret(settings, 'prefect-auth')}"


def client_env(settings: ServiceSettings) -> dict[str, str]:
    """Return the variables a Prefect client needs to use the service."""
    return {"PREFECT_API_URL": settings.api_url, "PREFECT_API_AUTH_STRING": auth_string(settings)}


@contextmanager
def api_client(settings: ServiceSettings) -> Iterator[httpx.Client]:
    """Yield an HTTP client of the Prefect API that passes its auth and CSRF checks."""
    token = base64.b64encode(auth_string(settings).encode()).decode()
    auth = {"Authorization": f"Basic {token}"}
    with httpx.Client(base_url=settings.api_url, headers=auth, timeout=30) as client:
        refresh_csrf(client)
        yield client


def refresh_csrf(client: httpx.Client) -> None:
    """Give ``client`` a new CSRF token of the server (a token lasts an hour)."""
    client_id = secrets.token_hex(8)
    csrf = client.get("/csrf-token", params={"client": client_id})
    csrf.raise_for_status()
    client.headers.update(
        {"Prefect-Csrf-Token": csrf.json()["token"], "Prefect-Csrf-Client": client_id}
    )


def _postgres_bin(program: str) -> str:
    """Return the path of a PostgreSQL server program from Debian's package."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"))
    if not found:
        raise ServiceError("PostgreSQL is not installed (apt-get install postgresql)")
    return found[-1]


def _as_postgres(command: list[str]) -> list[str]:
    """Return ``command`` run as the postgres user when we are root (PostgreSQL refuses root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _pg_data(settings: ServiceSettings) -> Path:
    return settings.dir / "postgres"


def _postgres_running(settings: ServiceSettings) -> bool:
    done = subprocess.run(
        _as_postgres([_postgres_bin("pg_ctl"), "-D", str(_pg_data(settings)), "status"]),
        capture_output=True,
    )
    return done.returncode == 0


def database_url(settings: ServiceSettings) -> str:
    """Return the Prefect server's database URL (the password from the service folder)."""
    password = _secret(settings, "postgres-password")
    return (
        f"postgresql+asyncpg://{DB_USER}:{password}@127.0.0.1:{settings.postgres_port}/{DATABASE}"
    )


def start_postgres(settings: ServiceSettings) -> None:
    """Initialize PostgreSQL's data folder on first use, start it on 127.0.0.1, and create
    the Prefect database if it is missing."""
    data = _pg_data(settings)
    password_file = settings.dir / "postgres-password"
    _secret(settings, "postgres-password")
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [
                    *(_postgres_bin("initdb"), "-D", str(data), "-U", DB_USER),
                    *("-A", "scram-sha-256", f"--pwfile={password_file}"),
                ]
            ),
            check=True,
            capture_output=True,
        )
    if not _postgres_running(settings):
        options = f"-p {settings.postgres_port} -k {data} -c listen_addresses=127.0.0.1"
        subprocess.run(
            _as_postgres(
                [
                    *(_postgres_bin("pg_ctl"), "-D", str(data), "-o", options),
                    *("-l", str(data / "postgres.log"), "-w", "start"),
                ]
            ),
            check=True,
            capture_output=True,
        )
    import psycopg

    url = database_url(settings).replace("+asyncpg", "").replace(f"/{DATABASE}", "/postgres")
    with psycopg.connect(url, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
        ).fetchone()
        if not exists:
            connection.execute(f"CREATE DATABASE {DATABASE}")


def stop_postgres(settings: ServiceSettings) -> bool:
    """Stop PostgreSQL; return True if it was running."""
    if not _pg_data(settings).exists() or not _postgres_running(settings):
        return False
    subprocess.run(
        _as_postgres(
            [_postgres_bin("pg_ctl"), "-D", str(_pg_data(settings)), "-m", "fast", "stop"]
        ),
        capture_output=True,
    )
    return True


def _pid(settings: ServiceSettings, name: str) -> int | None:
    """Return the pid recorded for ``name`` if that process still runs, else None."""
    try:
        pid = int((settings.dir / f"{name}.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def _start(settings: ServiceSettings, name: str, argv: list[str], env: dict[str, str]) -> None:
    """Start ``argv`` detached in a session of its own, logging to ``<name>.log``."""
    with (settings.dir / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (settings.dir / f"{name}.pid").write_text(str(process.pid))


def _stop(settings: ServiceSettings, name: str) -> bool:
    """Stop the process group recorded for ``name``; return True if it was running."""
    pid = _pid(settings, name)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _pid(settings, name) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid(settings, name):
        os.killpg(pid, signal.SIGKILL)
    (settings.dir / f"{name}.pid").unlink(missing_ok=True)
    return True


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(ready: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not ready():
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} did not start in {START_TIMEOUT_SECONDS:.0f} s: see {log}")
        time.sleep(0.5)


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def server_env(settings: ServiceSettings) -> dict[str, str]:
    """Return the Prefect server's environment: PostgreSQL, auth, CSRF protection."""
    return os.environ | {
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(settings),
        "PREFECT_SERVER_API_AUTH_STRING": auth_string(settings),
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": settings.api_url,
        "PREFECT_API_URL": "",
    }


def start_server(settings: ServiceSettings) -> None:
    """Start the Prefect server on PostgreSQL with auth, and wait until it answers."""
    if _pid(settings, "server") is None:
        argv = [_prefect(), "server", "start", "--host", settings.host]
        _start(settings, "server", [*argv, "--port", str(settings.port)], server_env(settings))
    _wait_for(
        lambda: _healthy(f"{settings.api_url}/health"),
        "the Prefect server",
        settings.dir / "server.log",
    )


def set_up_pool(settings: ServiceSettings) -> None:
    """Create (or update) the work pool with its limit and priority queues, and the
    deployments. (The limit on engine cores across runs is the host's: see
    :mod:`atomforge.flows.scheduling.cores`; a server-side one an older service made is
    removed.)"""
    with api_client(settings) as client:
        pool = {"name": POOL, "type": "process", "concurrency_limit": settings.worker_limit}
        created = client.post("/work_pools/", json=pool)
        if created.status_code == 409:
            limit = {"concurrency_limit": settings.worker_limit}
            client.patch(f"/work_pools/{POOL}", json=limit).raise_for_status()
        else:
            created.raise_for_status()
        _set_run_command(client, warm_command(settings) if settings.warm else None)
        client.delete(f"/v2/concurrency_limits/{CORES_LIMIT}")  # server-side, older services
        for name, priority in QUEUES.items():
            created = client.post(
                f"/work_pools/{POOL}/queues", json={"name": name, "priority": priority}
            )
            if created.status_code == 409:
                client.patch(
                    f"/work_pools/{POOL}/queues/{name}", json={"priority": priority}
                ).raise_for_status()
            else:
                created.raise_for_status()
        if settings.batch:
            _set_up_batch_pool(client)
    env = os.environ | client_env(settings)
    deployed = subprocess.run(
        [_prefect(), "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, capture_output=True
    )
    if deployed.returncode != 0:
        raise ServiceError(f"prefect deploy failed: {deployed.stderr.decode()[-500:]}")
    with api_client(settings) as client:
        set_up_batched_deployment(client, settings.batch)


BATCH_JOB_TEMPLATE = {
    "job_configuration": {"command": "{{ command }}"},
    "variables": {
        "type": "object",
        "properties": {
            "command": {
                "title": "Command",
                "type": "string",
                "description": "What a process worker started on this pool would run "
                "(none is: the batcher serves it).",
            }
        },
    },
}
"""The batch pool's job template: one variable, so that the server's check of every new
run's job variables against it costs little (the process template's took about 30 ms of
the server's CPU a run)."""


def _set_up_batch_pool(client: httpx.Client) -> None:
    """Create the batch pool, or give it back its template: a pool with no limit on its
    runs, which the batcher polls."""
    pool = {"name": BATCH_POOL, "type": "process", "base_job_template": BATCH_JOB_TEMPLATE}
    created = client.post("/work_pools/", json=pool)
    if created.status_code == 409:
        update = {"base_job_template": BATCH_JOB_TEMPLATE, "concurrency_limit": None}
        client.patch(f"/work_pools/{BATCH_POOL}", json=update).raise_for_status()
    else:
        created.raise_for_status()


def set_up_batched_deployment(client: httpx.Client, batch: bool) -> str | None:
    """Create (or update) ``simulate/batched`` from ``simulate/simulate`` on the batch
    pool; without ``batch``, delete it (nothing would serve its runs). Return its id, or
    None when there is none.

    The server does not check its runs' parameters against the form's schema (that took
    about 0.15 s of its CPU a run): the batcher checks each request as ``simulate``
    does, and a bad one fails alone with a one-line message."""
    flow, name = BATCH_DEPLOYMENT
    found = client.get(f"/deployments/name/{flow}/{name}")
    if not batch:
        if found.status_code == 200:
            client.delete(f"/deployments/{found.json()['id']}").raise_for_status()
        return None
    source = client.get(f"/deployments/name/{flow}/{flow}")
    source.raise_for_status()
    model = source.json()
    body = {key: model[key] for key in DEPLOYMENT_FIELDS if key in model}
    body |= {
        "name": name,
        "flow_id": model["flow_id"],
        "work_pool_name": BATCH_POOL,
        "work_queue_name": "default",
        "job_variables": {},
        "enforce_parameter_schema": False,
        "description": "One structure, computed together with other requests of this "
        "deployment in a batch (the batcher of `atomforge service`): "
        + (model.get("description") or ""),
    }
    made = client.post("/deployments/", json=body)
    made.raise_for_status()
    return made.json()["id"]


def _start_until_ready(
    settings: ServiceSettings,
    name: str,
    argv: list[str],
    env: dict[str, str],
    ready: Path,
    what: str,
    wait: bool = True,
) -> None:
    """Start the part ``name`` (``argv``) unless it runs, removing its ``ready`` file
    first; with ``wait``, return once ``ready`` exists (ServiceError if the part ended
    instead)."""
    if _pid(settings, name) is None:
        ready.unlink(missing_ok=True)
        _start(settings, name, argv, env)
    if not wait:
        return
    log = settings.dir / f"{name}.log"
    _wait_for(lambda: ready.exists() or _pid(settings, name) is None, what, log)
    if _pid(settings, name) is None:
        raise ServiceError(f"{what} ended: see {log}")


def warm_socket(settings: ServiceSettings) -> Path:
    """Return the path of the warm executor's socket."""
    return settings.dir / "warm.sock"


def warm_command(settings: ServiceSettings) -> str:
    """Return the command the pool's job template runs for each flow run: the warm
    executor's client (it runs ``python -m prefect.engine`` itself when none answers)."""
    client = Path(warm_client.__file__).resolve()
    return shlex.join([sys.executable, "-I", "-S", str(client), str(warm_socket(settings))])


def _set_run_command(client: httpx.Client, command: str | None) -> None:
    """Make ``command`` the default command of the pool's job template (None: Prefect's)."""
    pool = client.get(f"/work_pools/{POOL}")
    pool.raise_for_status()
    template = pool.json()["base_job_template"]
    if not template.get("variables"):
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
    variable = template["variables"]["properties"]["command"]
    if variable.get("default") != command:
        variable["default"] = command
        update = {"base_job_template": template}
        client.patch(f"/work_pools/{POOL}", json=update).raise_for_status()


def worker_env(settings: ServiceSettings) -> dict[str, str]:
    """Return the environment of the worker and of the warm executor (its runs'
    ``PREFECT_*`` settings must match those the executor imported Prefect with); its
    Prefect clients load a one-certificate file, not the CA bundle (the API is plain
    HTTP: see :mod:`atomforge.deployments.api_trust`)."""
    env = os.environ | client_env(settings)
    if "PREFECT_API_SSL_CERT_FILE" not in env:
        env["PREFECT_API_SSL_CERT_FILE"] = str(unused_ca(settings.dir / "api-no-tls.pem"))
    env["PREFECT_WORKER_WEBSERVER_PORT"] = str(settings.worker_health_port)
    query = settings.worker_query_seconds or (5.0 if settings.consumer else 0.25)
    env["PREFECT_WORKER_QUERY_SECONDS"] = str(query)
    env.setdefault("ATOMFORGE_CORES_LIMIT", CORES_LIMIT)
    return env


def start_warm(settings: ServiceSettings) -> None:
    """Start the warm executor, and wait until it listens."""
    path = warm_socket(settings)
    if len(str(path).encode()) > 107:
        raise ServiceError(f"the socket path {path} is too long: set ATOMFORGE_SERVICE_DIR")
    argv = [sys.executable, "-m", warm_exec.MODULE, str(path)]
    _start_until_ready(settings, "warm", argv, worker_env(settings), path, "the warm executor")


def batcher_env(settings: ServiceSettings) -> dict[str, str]:
    """Return the batcher's environment: the worker's, without plots unless
    ``ATOMFORGE_PLOTS`` says otherwise (a batch of unrelated requests has no ranking
    to draw, and drawing costs 0.2-0.3 s a batch)."""
    env = worker_env(settings)
    env.setdefault("ATOMFORGE_PLOTS", "false")
    return env


def start_batcher(settings: ServiceSettings, wait: bool = True) -> None:
    """Start the batcher unless it runs, and with ``wait``, wait until it serves the
    batch pool (raise ServiceError if it ended instead)."""
    ready = settings.dir / "batcher.ready"
    argv = [sys.executable, "-m", "atomforge.deployments.batcher"]
    _start_until_ready(settings, "batcher", argv, batcher_env(settings), ready, "the batcher", wait)


def consumer_env(settings: ServiceSettings) -> dict[str, str]:
    """Return the consumer's environment: the worker's, with ``OMP_NUM_THREADS=1`` unless
    it sets one. Its own numerical libraries then run one thread, as an ASE runner of
    one core does, so its request children may fork their runner zygote from themselves
    (:func:`atomforge.engines.warm_runner.prewarm`); each engine sets its
    own threads."""
    env = worker_env(settings)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_consumer(settings: ServiceSettings, wait: bool = True) -> None:
    """Start the warm consumer unless it runs, and with ``wait``, wait until it polls
    (raise ServiceError if it ended instead)."""
    ready = settings.dir / "consumer.ready"
    argv = [sys.executable, "-m", "atomforge.deployments.consumer"]
    env = consumer_env(settings)
    _start_until_ready(settings, "consumer", argv, env, ready, "the consumer", wait)


def start_worker(settings: ServiceSettings) -> None:
    """Start a process worker on the pool with Prefect's health check, and wait for it."""
    if _pid(settings, "worker") is None:
        argv = [_prefect(), "worker", "start", "--pool", POOL, "--with-healthcheck"]
        argv += ["--limit", str(settings.worker_limit)]
        _start(settings, "worker", argv, worker_env(settings))
    _wait_for(
        lambda: _healthy(f"http://127.0.0.1:{settings.worker_health_port}/health"),
        "the worker",
        settings.dir / "worker.log",
    )


def up(settings: ServiceSettings) -> None:
    """Start PostgreSQL, the server, the pool with its queues and deployments, the
    batcher (or stop it, when batching is off) and the worker."""
    settings.dir.mkdir(parents=True, exist_ok=True)
    settings.dir.chmod(0o755)
    start_postgres(settings)
    start_server(settings)
    set_up_pool(settings)
    if settings.batch:
        start_batcher(settings, wait=False)  # it imports the flows while the others start
    else:
        _stop(settings, "batcher")
    if settings.consumer:
        start_consumer(settings, wait=False)
    else:
        _stop(settings, "consumer")
    if settings.warm:
        start_warm(settings)
    start_worker(settings)
    if settings.batch:
        start_batcher(settings)
    if settings.consumer:
        start_consumer(settings)


def down(settings: ServiceSettings) -> list[str]:
    """Stop the worker with its warm executor, the batcher and the consumer, the server
    and PostgreSQL; return the names of those that ran (the batcher and the consumer
    count as the worker)."""
    batcher = _stop(settings, "batcher")
    consumer = _stop(settings, "consumer")
    worker = _stop(settings, "worker")
    warm = _stop(settings, "warm")
    stopped = ["worker"] if worker or warm or batcher or consumer else []
    stopped += ["server"] if _stop(settings, "server") else []
    return stopped + (["postgres"] if stop_postgres(settings) else [])


def status(settings: ServiceSettings) -> list[Part]:
    """Return each part of the service and whether it is up."""
    postgres = _pg_data(settings).exists() and _postgres_running(settings)
    parts = [Part("postgres", postgres, f"127.0.0.1:{settings.postgres_port}")]
    server = _healthy(f"{settings.api_url}/health")
    parts.append(Part("server", server, settings.api_url.removesuffix("/api")))
    queues = []
    if server:
        with api_client(settings) as client:
            listed = client.post(f"/work_pools/{POOL}/queues/filter", json={})
        if listed.status_code == 200:
            queues = sorted((q["priority"], q["name"]) for q in listed.json())
    pool = f"{POOL}: queues " + ", ".join(f"{name} ({p})" for p, name in queues)
    parts.append(Part("pool", bool(queues), pool if queues else f"{POOL}: not found"))
    worker = _healthy(f"http://127.0.0.1:{settings.worker_health_port}/health")
    detail = f"health check on :{settings.worker_health_port}"
    warm = _pid(settings, "warm")
    if settings.warm:
        detail += f", warm executor pid {warm}" if warm else ", warm executor DOWN"
    batcher = _pid(settings, "batcher")
    if settings.batch:
        detail += f", batcher pid {batcher} ({BATCH_POOL})" if batcher else ", batcher DOWN"
    consumer = _pid(settings, "consumer")
    if settings.consumer:
        detail += f", consumer pid {consumer}" if consumer else ", consumer DOWN"
    alive = worker and (warm is not None or not settings.warm)
    alive = alive and (consumer is not None or not settings.consumer)
    parts.append(Part("worker", alive and (batcher is not None or not settings.batch), detail))
    return parts


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return its exit code."""
    parser = argparse.ArgumentParser(
        prog="atomforge service", description="PostgreSQL, Prefect server, pool and worker."
    )
    parser.add_argument("action", choices=("up", "status", "down", "env"))
    args = parser.parse_args(argv)
    settings = ServiceSettings()
    if args.action == "up":
        try:
            up(settings)
        except (ServiceError, subprocess.CalledProcessError, httpx.HTTPError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"up: Prefect UI at {settings.api_url.removesuffix('/api')} (user admin, password")
        print(f"in {settings.dir / 'prefect-auth'}); clients: eval $(atomforge service env)")
        return 0
    if args.action == "down":
        print("stopped: " + (", ".join(down(settings)) or "nothing was running"))
        return 0
    if args.action == "env":
        for key, value in client_env(settings).items():
            print(f"export {key}='{value}'")
        return 0
    parts = status(settings)
    for part in parts:
        print(f"{part.name:9}{'up' if part.up else 'DOWN':6}{part.detail}")
    return 0 if all(part.up for part in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
