"""The MLflow tracking server (REST API + UI): the packaged ``server.sh`` (``mlflow/server.sh`` in a checkout links to
it) over the same SQLite store
loraline uses without a server (``<home>/mlflow.db``), serving artifacts from ``<home>/mlartifacts``; its URL is
recorded in ``<home>/services/mlflow/url``."""

from __future__ import annotations

import os
import sys
from importlib.resources import as_file, files
from pathlib import Path

from loraline.errors import ServiceError
from loraline.probe import http_ok
from loraline.services.process import HOST, alive_pid, service_dir, service_port, spawn, state, wait_up
from loraline.settings import Settings

# The start script, package data (the wheel ships it; `mlflow/server.sh` in a checkout is a link to it). Run with bash.
MLFLOW_SCRIPT = files("loraline") / "data" / "mlflow" / "server.sh"
MLFLOW_START_TIMEOUT_S = 120.0  # the first start creates and migrates the SQLite DB: ~15 s on 2 cores


def mlflow_ok(url: str, timeout_s: float = 3.0) -> bool:
    """Does an MLflow server answer ``GET <url>/health`` with 200?"""
    return http_ok(f"{url}/health", timeout_s)


def mlflow_url(settings: Settings, timeout_s: float = 3.0) -> str | None:
    """The URL of this home's MLflow server if its process is alive and /health answers.

    The pid is checked too: after ``down`` the recorded port may belong to someone else's server.
    """
    url = state(settings, "mlflow", "url")
    if url is None or alive_pid(settings.home / "services" / "mlflow") is None:
        return None
    return url if mlflow_ok(url, timeout_s) else None


def start_mlflow(settings: Settings, port: int = 0, *, backend: str | None = None, artifacts: str | None = None,
                 secret_env: dict[str, str] | None = None) -> str:
    """Start the packaged ``server.sh`` on 127.0.0.1 over ``sqlite:///<home>/mlflow.db``; return its URL.

    Idempotent: a server this home started that still answers is returned as is. The store is the
    same SQLite file loraline writes to without a server, so runs from before and after are in one
    place. Artifacts of experiments created through the server are ``mlflow-artifacts:/`` URIs,
    stored under ``<home>/mlartifacts`` and read back through the server.

    The production stack passes ``backend`` (``postgresql://USER@HOST:PORT/DB``, no password), ``artifacts``
    (``s3://BUCKET/PREFIX``) and ``secret_env`` (``PGPASSWORD``, the S3 keys and endpoint): environment only, so no
    secret is on the server's command line; the server alone holds the S3 keys (clients get ``mlflow-artifacts:/``).
    """
    d = service_dir(settings, "mlflow")
    running = mlflow_url(settings)
    if running:
        return running
    if not MLFLOW_SCRIPT.is_file():
        raise ServiceError(f"the MLflow start script {MLFLOW_SCRIPT} is missing from the installed loraline package "
                           "(package data loraline/data/mlflow/server.sh): reinstall loraline")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        raise ServiceError(f"no mlflow executable beside {sys.executable}: install loraline's dependencies into this "
                           "environment (pip install . from a loraline checkout)")
    port = port or service_port(d)
    url = f"http://{HOST}:{port}"
    if artifacts is None:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **(secret_env or {}),
        "MLFLOW_BACKEND_STORE_URI": backend or f"sqlite:///{settings.home / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts or str(settings.artifact_root),
        "MLFLOW_HOST": HOST,
        "MLFLOW_PORT": str(port),
        "MLFLOW_BIN": str(mlflow_bin),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }
    # as_file: the installed file itself (a temporary copy only if loraline were imported from a zip, kept until the
    # server answers: bash has opened it by then).
    with as_file(MLFLOW_SCRIPT) as script:
        spawn(["bash", str(script)], d, env=env)
        (d / "url").write_text(url)
        wait_up(lambda: mlflow_ok(url), f"the MLflow server on {url}", d, timeout_s=MLFLOW_START_TIMEOUT_S)
    return url
