"""The Prefect server (API + UI): ``prefect server start`` over ``<home>/prefect/prefect.db``, as a subprocess (the
library never imports prefect); and beside it the deployment runner, ``python -m loraline_flows.serve`` (the
checkout's flows/, installed as the package loraline_flows), which creates loraline's deployments on that server and
executes the runs started from the UI's Run button (Prefect's ``serve``). Their URLs and pids are under
``<home>/services/prefect/`` and ``.../serve/``."""

from __future__ import annotations

import os
import sys

from loraline.probe import http_ok
from loraline.services.process import HOST, alive_pid, service_dir, service_port, spawn, state, wait_up
from loraline.settings import Settings

PREFECT_START_TIMEOUT_S = 180.0  # the first start migrates its SQLite DB and copies the UI bundle


def prefect_ok(url: str, timeout_s: float = 3.0) -> bool:
    return http_ok(f"{url}/api/health", timeout_s)


def prefect_url(settings: Settings, timeout_s: float = 3.0) -> str | None:
    """The URL of this home's Prefect server if its process is alive and /api/health answers."""
    url = state(settings, "prefect", "url")
    if url is None or alive_pid(settings.home / "services" / "prefect") is None:
        return None
    return url if prefect_ok(url, timeout_s) else None


def start_prefect(settings: Settings, port: int = 0, *, database_url: str | None = None) -> str:
    """Start ``prefect server start`` (API + UI) on 127.0.0.1; return its URL (the API is under ``/api``).

    Its database is ``<home>/prefect/prefect.db``, the one loraline's commands use in Prefect's
    ephemeral mode when no server runs, so flow runs from before ``services up`` show in the UI too.
    The production stack passes ``database_url`` (``postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB``): it is put in
    the server's environment only, never on its command line.
    """
    d = service_dir(settings, "prefect")
    running = prefect_url(settings)
    if running:
        return running
    port = port or service_port(d)
    url = f"http://{HOST}:{port}"
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),  # the UI asks the API here (not from --port)
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_UI_API_URL": f"{url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        # The V2 UI (3.8's default at /) loads Amplitude analytics from the browser, whatever the analytics setting
        # says (seen: requests to sr-client-cfg.amplitude.com); V1 makes none, so it is the default here.
        "PREFECT_SERVER_UI_V2_ENABLED": "false",
        "PREFECT_UI_STATIC_DIRECTORY": str(d / "ui"),  # the UI bundle is copied here, not into the venv
        "DO_NOT_TRACK": "1",
    }
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    spawn([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"],
          d, env=env)
    (d / "url").write_text(url)
    wait_up(lambda: prefect_ok(url), f"the Prefect server on {url}", d, timeout_s=PREFECT_START_TIMEOUT_S)
    return url


# --------------------------------------------------------------------------- deployment runner

# loraline_flows/serve.py (flows/serve.py in a checkout): flow name == deployment name
DEPLOYMENTS = ("release", "benchmark", "image", "trace", "watch")
SERVE_START_TIMEOUT_S = 180.0
# The runner's module: the flows/ folder of the checkout, installed as the package loraline_flows (a name of loraline's
# own: nothing installed is a top-level `flows`). This library only names it: it never imports it, nor prefect.
SERVE_MODULE = "loraline_flows.serve"


def deployments(url: str, timeout_s: float = 5.0) -> list[str]:
    """``flow/deployment`` names the Prefect server at ``url`` has (empty when it does not answer)."""
    import httpx

    try:
        with httpx.Client(base_url=f"{url}/api", timeout=timeout_s) as c:
            flows = {f["id"]: f["name"] for f in c.post("/flows/filter", json={}).json()}
            return sorted(f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in c.post("/deployments/filter", json={}).json())
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


def serve_running(settings: Settings) -> bool:
    return alive_pid(settings.home / "services" / "serve") is not None


def start_serve(settings: Settings, url: str, env: dict[str, str] | None = None) -> list[str]:
    """Start the runner that creates loraline's deployments on the Prefect server at ``url`` and executes their runs
    (``python -m loraline_flows.serve``: the UI's Run button works once it is up). Returns the deployments it serves."""
    d = service_dir(settings, "serve")
    want = [f"{n}/{n}" for n in DEPLOYMENTS]
    if serve_running(settings):
        return want
    full = {**os.environ, **(env or {}), "PREFECT_API_URL": f"{url}/api", "LORALINE_HOME": str(settings.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "TOKENIZERS_PARALLELISM": "false"}
    log = d / "log"
    start = log.stat().st_size if log.exists() else 0
    # Found wherever loraline is installed (no checkout needed). Run in its service directory: a cwd that lasts as
    # long as the runner and holds no module that `python -m` (cwd first on sys.path) could take for an installed one.
    pid = spawn([sys.executable, "-m", SERVE_MODULE], d, env=full, cwd=d)

    def ready() -> bool:  # the deployments exist and the runner said it polls for runs
        text = log.read_bytes()[start:].decode(errors="replace")
        return "polling" in text and all(w in deployments(url) for w in want)

    wait_up(ready, f"the deployment runner (pid {pid}) for {url}", d, timeout_s=SERVE_START_TIMEOUT_S)
    return want
