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
from loraline.services.process import HOST, PACKAGES, alive_pid, ensure_packages, state, stop, unmount_under
from loraline.settings import Settings

__all__ = [
    "DEPLOYMENTS", "HOST", "MLFLOW_SCRIPT", "MLFLOW_START_TIMEOUT_S", "PACKAGES", "PREFECT_START_TIMEOUT_S",
    "SERVE_MODULE", "SERVE_START_TIMEOUT_S", "ServicesStatus", "configured", "deployments", "docker_host", "docker_ok", "down",
    "ensure_packages", "mlflow_ok", "mlflow_url", "prefect_ok", "prefect_url", "registry_ok", "serve_running",
    "short_dir", "short_path", "start_docker", "start_mlflow", "start_prefect", "start_registry", "start_serve", "status", "unmount_under",
    "up",
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def up(settings: Settings) -> ServicesStatus:
    start_docker(settings)
    start_registry(settings)
    start_mlflow(settings)
    url = start_prefect(settings)
    start_serve(settings, url)
    return status(settings)


def status(settings: Settings) -> ServicesStatus:
    host = f"unix://{short_path(settings) / 'docker.sock'}"  # not docker_host(): status creates nothing
    addr = state(settings, "registry", "addr")
    dok, rok = docker_ok(host), bool(addr and registry_ok(addr))
    url, purl = mlflow_url(settings), prefect_url(settings)
    serving = purl is not None and serve_running(settings)
    return ServicesStatus(docker_host=host if dok else None, registry=addr if rok else None, mlflow_url=url,
                          prefect_url=purl, deployments=deployments(purl) if serving else [],
                          running={"docker": dok, "registry": rok, "mlflow": url is not None,
                                   "prefect": purl is not None, "deployments": serving}, home=str(settings.home))


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
    """Stop what ``up`` started (the deployment runner, Prefect and MLflow first, then the registry, then the engine,
    which stops its containers)."""
    for name in ("serve", "prefect", "mlflow", "registry", "docker"):
        d = settings.home / "services" / name
        if stop(d, grace_s) and name == "docker":  # dockerd bind-mounts its data root and leaves it (and a netns) mounted
            unmount_under(d, short_path(settings))
            shutil.rmtree(short_path(settings), ignore_errors=True)  # its socket and exec root: runtime state only
    return status(settings)
