"""The embedded local services, on 127.0.0.1 only: a Docker engine, an image registry, an MLflow server, a Prefect server.

``loraline services up`` starts what is not running yet, ``down`` stops what it started,
``status`` reports it. State lives under ``<home>/services/``: one directory per service with
its pid file, log and data. The Docker engine is Debian's ``dockerd`` (package ``docker.io``)
listening on a unix socket under that directory, without iptables or a bridge (containers use
``--network host``); the registry is Debian's ``docker-registry`` (the CNCF distribution
registry) with a filesystem store, bound to ``127.0.0.1:<port>``. Missing packages are installed
with ``apt-get`` when this process may (root); otherwise the error says what to install.
The MLflow tracking server (REST API + UI) is ``mlflow/server.sh`` (package data) over the same SQLite store
loraline uses without a server (``<home>/mlflow.db``), serving artifacts from ``<home>/mlartifacts``.
The Prefect server (API + UI) is ``prefect server start`` over ``<home>/prefect/prefect.db``; while it
runs, loraline's commands send their flow runs there instead of to an ephemeral server. Beside it,
``python -m loraline_flows.serve`` creates loraline's deployments there and executes the runs started from the
UI's Run button (a runner: Prefect's ``serve``).

``services up --production`` starts the production stack instead (issue 15): PostgreSQL
(:mod:`~loraline.services.postgres`), an S3 object store (:mod:`~loraline.services.object_store`), MLflow on
PostgreSQL with its artifacts in the bucket, Prefect on PostgreSQL with a ``process`` work pool, loraline's
deployments made by ``prefect deploy --all`` and two workers (:mod:`~loraline.services.work_pool`) instead of the
``serve`` runner; the Docker engine and registry as above. Which stack runs is recorded in ``<home>/services/stack``.

One module per service: :mod:`~loraline.services.docker_engine`, :mod:`~loraline.services.image_registry`,
:mod:`~loraline.services.mlflow_server`, :mod:`~loraline.services.prefect_server` (the Prefect server and the
deployment runner); :mod:`~loraline.services.process` has what they share (state directory, pid, log, start, wait,
stop). Their public functions are importable from here (``services.start_mlflow``, ``services.prefect_url``, ...).

:func:`configured` fills the settings a user left unset (tracking URI, Docker host, image registry)
from the services running for that home, so commands pick them up without exports.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from typing import Any

from loraline.services.docker_engine import docker_host, docker_ok, short_dir, short_path, start_docker
from loraline.services.image_registry import registry_ok, start_registry
from loraline.services.mlflow_server import MLFLOW_SCRIPT, MLFLOW_START_TIMEOUT_S, mlflow_ok, mlflow_url, start_mlflow
from loraline.services.prefect_server import (
    DEPLOYMENTS,
    PREFECT_START_TIMEOUT_S,
    SERVE_MODULE,
    SERVE_START_TIMEOUT_S,
    deployments,
    prefect_ok,
    prefect_url,
    serve_running,
    start_prefect,
    start_serve,
)
from loraline.services.object_store import object_store, start_object_store, stop_object_store
from loraline.services.postgres import postgres, start_postgres, stop_postgres
from loraline.services.process import HOST, PACKAGES, alive_pid, ensure_packages, state, stop, unmount_under
from loraline.services.work_pool import (
    WORK_POOL,
    deploy,
    ensure_crash_automation,
    ensure_work_pool,
    start_workers,
    stop_workers,
    workers_running,
)
from loraline.errors import ServiceError
from loraline.settings import Settings

__all__ = [
    "DEPLOYMENTS", "HOST", "MLFLOW_SCRIPT", "MLFLOW_START_TIMEOUT_S", "PACKAGES", "PREFECT_START_TIMEOUT_S",
    "SERVE_MODULE", "SERVE_START_TIMEOUT_S", "ServicesStatus", "configured", "deployments", "docker_host", "docker_ok", "down",
    "ensure_packages", "mlflow_ok", "mlflow_url", "prefect_ok", "prefect_url", "registry_ok", "serve_running",
    "short_dir", "short_path", "start_docker", "start_mlflow", "start_prefect", "start_registry", "start_serve", "status", "unmount_under",
    "WORK_POOL", "object_store", "postgres", "stack", "start_object_store", "start_postgres", "start_workers", "stop_object_store",
    "stop_postgres", "stop_workers", "up", "workers_running",
]


@dataclass(frozen=True)
class ServicesStatus:
    docker_host: str | None  # unix:///.../docker.sock when the engine answers
    registry: str | None  # 127.0.0.1:PORT when the registry answers
    mlflow_url: str | None  # http://127.0.0.1:PORT when the MLflow server's /health answers
    prefect_url: str | None  # http://127.0.0.1:PORT (UI; API under /api) when the Prefect server's /api/health answers
    deployments: list[str]  # flow/deployment names on that server while the runner of `up` serves them
    running: dict[str, bool]
    home: str
    stack: str = "embedded"  # or "production" (`services up --production`)
    postgres: str | None = None  # postgresql://USER@127.0.0.1:PORT (no password) when PostgreSQL runs
    s3_endpoint: str | None = None  # http://127.0.0.1:PORT of the S3 gateway when it answers
    s3_bucket: str | None = None
    s3_credentials_file: str | None = None  # the store's keys (0600, AWS shared-credentials format), for an operator
    work_pool: str | None = None
    workers: list[str] | None = None  # the pool's workers this home runs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stack(settings: Settings) -> str:
    """The stack this home's services are: ``production`` or ``embedded`` (also when none ran yet)."""
    return state(settings, "", "stack") or "embedded"


def up(settings: Settings, production: bool | None = None) -> ServicesStatus:
    """Start the services: the stack recorded for this home (embedded when none), or the one asked for. A home whose
    other stack still runs is refused: `services down` first (their stores differ)."""
    want = stack(settings) if production is None else ("production" if production else "embedded")
    current = status(settings)
    if want != current.stack and any(v for k, v in current.running.items() if k not in ("docker", "registry")):
        raise ServiceError(f"the {current.stack} stack of {settings.home} is running: `loraline services down` first, "
                           f"then `loraline services up{' --production' if want == 'production' else ''}`")
    (settings.home / "services").mkdir(parents=True, exist_ok=True)
    (settings.home / "services" / "stack").write_text(want)
    start_docker(settings)
    start_registry(settings)
    if want == "embedded":
        start_mlflow(settings)
        url = start_prefect(settings)
        start_serve(settings, url)
        return status(settings)
    pg = start_postgres(settings)
    store = start_object_store(settings)
    start_mlflow(settings, backend=pg.url("mlflow"), artifacts=f"s3://{store.bucket}/artifacts",
                 secret_env={"PGPASSWORD": pg.password(), **store.env()})
    url = start_prefect(settings, database_url=pg.url_with_password("prefect", driver="postgresql+asyncpg"))
    ensure_work_pool(url)
    ensure_crash_automation(url, settings.crash_after_s)
    deploy(settings, url)
    access, secret = store.keys()  # runs read s3:// sources with these (boto3's standard variables)
    start_workers(settings, url, env={"LORALINE_S3_ENDPOINT_URL": store.endpoint, "AWS_ACCESS_KEY_ID": access,
                                      "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"})
    return status(settings)


def status(settings: Settings) -> ServicesStatus:
    host = f"unix://{short_path(settings) / 'docker.sock'}"  # not docker_host(): status creates nothing
    addr = state(settings, "registry", "addr")
    dok, rok = docker_ok(host), bool(addr and registry_ok(addr))
    url, purl = mlflow_url(settings), prefect_url(settings)
    kind = stack(settings)
    if kind == "embedded":
        serving = purl is not None and serve_running(settings)
        return ServicesStatus(docker_host=host if dok else None, registry=addr if rok else None, mlflow_url=url,
                              prefect_url=purl, deployments=deployments(purl) if serving else [],
                              running={"docker": dok, "registry": rok, "mlflow": url is not None,
                                       "prefect": purl is not None, "deployments": serving}, home=str(settings.home))
    pg, store, workers = postgres(settings), object_store(settings), workers_running(settings)
    return ServicesStatus(docker_host=host if dok else None, registry=addr if rok else None, mlflow_url=url,
                          prefect_url=purl, deployments=deployments(purl) if purl else [],
                          running={"docker": dok, "registry": rok, "postgres": pg is not None, "s3": store is not None,
                                   "mlflow": url is not None, "prefect": purl is not None,
                                   "workers": len(workers) > 0},
                          home=str(settings.home), stack=kind, postgres=pg.server_url() if pg else None,
                          s3_endpoint=store.endpoint if store else None, s3_bucket=store.bucket if store else None,
                          s3_credentials_file=str(store.credentials_file) if store else None,
                          work_pool=WORK_POOL, workers=workers)


def configured(settings: Settings) -> Settings:
    """``settings`` with the fields the user left unset filled from the services running for its home.

    ``tracking_uri`` from the MLflow server (``registry_uri`` follows it when unset), ``docker_host``
    from the engine, ``image_registry`` from the registry; each only if it answers now. Fields already
    set are kept. Cheap when nothing runs: it stats the state files and makes at most one quick
    check (<= 2 s) per service that looks alive. Returns a copy; ``settings`` is not changed.
    """
    update: dict[str, str] = {}
    if settings.tracking_uri is None and (url := mlflow_url(settings, timeout_s=2.0)):
        update["tracking_uri"] = url
    if settings.docker_host is None:
        sock = short_path(settings) / "docker.sock"
        if sock.exists() and docker_ok(f"unix://{sock}", timeout_s=2.0):
            update["docker_host"] = f"unix://{sock}"
    addr = state(settings, "registry", "addr")
    if (settings.image_registry is None and addr and alive_pid(settings.home / "services" / "registry")
            and registry_ok(addr, timeout_s=2.0)):
        update["image_registry"] = addr
    return settings.model_copy(update=update) if update else settings


def down(settings: Settings, grace_s: float = 20.0) -> ServicesStatus:
    """Stop what ``up`` started (the deployment runner or the workers, Prefect and MLflow first, then the object store
    and PostgreSQL, then the registry, then the engine, which stops its containers)."""
    stop_workers(settings)
    for name in ("serve", "prefect", "mlflow"):
        stop(settings.home / "services" / name, grace_s)
    stop_object_store(settings)
    stop_postgres(settings)
    for name in ("registry", "docker"):
        d = settings.home / "services" / name
        if stop(d, grace_s) and name == "docker":  # dockerd bind-mounts its data root and leaves it (and a netns) mounted
            unmount_under(d, short_path(settings))
            shutil.rmtree(short_path(settings), ignore_errors=True)  # its socket and exec root: runtime state only
    return status(settings)
