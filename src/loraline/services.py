"""The embedded local services, on 127.0.0.1 only: a Docker engine, an image registry, an MLflow server, a Prefect server.

``loraline services up`` starts what is not running yet, ``down`` stops what it started,
``status`` reports it. State lives under ``<home>/services/``: one directory per service with
its pid file, log and data. The Docker engine is Debian's ``dockerd`` (package ``docker.io``)
listening on a unix socket under that directory, without iptables or a bridge (containers use
``--network host``); the registry is Debian's ``docker-registry`` (the CNCF distribution
registry) with a filesystem store, bound to ``127.0.0.1:<port>``. Missing packages are installed
with ``apt-get`` when this process may (root); otherwise the error says what to install.
The MLflow tracking server (REST API + UI) is ``mlflow/server.sh`` over the same SQLite store
loraline uses without a server (``<home>/mlflow.db``), serving artifacts from ``<home>/mlartifacts``.
The Prefect server (API + UI) is ``prefect server start`` over ``<home>/prefect/prefect.db``; while it
runs, loraline's commands send their flow runs there instead of to an ephemeral server. Beside it,
``python -m flows.serve`` creates loraline's deployments there and executes the runs started from the
UI's Run button (a runner: Prefect's ``serve``).

:func:`configured` fills the settings a user left unset (tracking URI, Docker host, image registry)
from the services running for that home, so commands pick them up without exports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraline.errors import ServiceError
from loraline.probe import http_ok, wait_until
from loraline.settings import Settings

HOST = "127.0.0.1"
PACKAGES = {"dockerd": "docker.io", "docker-registry": "docker-registry"}
# The repository's start script (not packaged: services run from a checkout).
MLFLOW_SCRIPT = Path(__file__).resolve().parents[2] / "mlflow" / "server.sh"
MLFLOW_START_TIMEOUT_S = 120.0  # the first start creates and migrates the SQLite DB: ~15 s on 2 cores


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


def ensure_packages(*commands: str) -> None:
    """Install the Debian packages that provide ``commands`` if any is missing (root only)."""
    missing = [PACKAGES[c] for c in commands if shutil.which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServiceError(f"missing {', '.join(commands)}: install the Debian packages {' '.join(missing)} "
                           f"(sudo apt-get install -y {' '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")


def _dir(settings: Settings, name: str) -> Path:
    d = settings.home / "services" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pid(d: Path) -> int | None:
    """The service's pid if it is alive (a child of this process that exited is reaped, not counted)."""
    try:
        pid = int((d / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass  # not our child (started by an earlier `services up`)
    try:
        os.kill(pid, 0)
        return pid
    except OSError:
        return None


def _spawn(cmd: list[str], d: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    with (d / "log").open("ab") as log:
        log.write(("\n$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=cwd)  # outlives this process until `down`
    (d / "pid").write_text(str(proc.pid))
    return proc.pid


def _wait(check: Any, what: str, d: Path, timeout_s: float = 60.0) -> None:
    if wait_until(check, timeout_s, interval_s=0.3, gone=lambda: "exited" if _pid(d) is None else None).ready:
        return
    tail = "\n".join((d / "log").read_text(errors="replace").splitlines()[-20:]) if (d / "log").exists() else ""
    raise ServiceError(f"{what} did not come up (log: {d / 'log'}):\n{tail}")


# --------------------------------------------------------------------------- Docker engine


def _short_path(settings: Settings) -> Path:
    """Sockets live under a short path (unix socket paths are limited to 107 bytes): /tmp/loraline-<hash of home>."""
    import hashlib

    return Path("/tmp") / f"loraline-{hashlib.sha256(str(settings.home).encode()).hexdigest()[:12]}"


def _short_dir(settings: Settings) -> Path:
    d = _short_path(settings)
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def docker_host(settings: Settings) -> str:
    return f"unix://{_short_dir(settings) / 'docker.sock'}"


def docker_ok(host: str, timeout_s: float = 5.0) -> bool:
    """Does a Docker engine answer at ``host``?"""
    try:
        import docker

        client = docker.DockerClient(base_url=host, timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - connection refused, no socket, timeout: "not answering"
        if isinstance(e, PermissionError) or "Permission denied" in str(e):  # it may well run: we may not use it
            raise ServiceError(f"the Docker engine at {host} refused this user ({e}): run as a user allowed on its "
                               "socket (root, or the docker group), or point LORALINE_DOCKER_HOST at an engine you may use") from e
        return False


def start_docker(settings: Settings) -> str:
    d = _dir(settings, "docker")
    host = docker_host(settings)
    if docker_ok(host):
        return host
    ensure_packages("dockerd")
    short = _short_dir(settings)
    (short / "docker.sock").unlink(missing_ok=True)
    cmd = ["dockerd", "--storage-driver=overlay2", "--iptables=false", "--ip-masq=false", "--bridge=none",
           f"--data-root={d / 'data'}", f"--exec-root={short / 'exec'}", f"--pidfile={d / 'dockerd.pid'}",
           "-H", host]
    _spawn(cmd, d)
    _wait(lambda: docker_ok(host), "the Docker engine", d)
    return host


# --------------------------------------------------------------------------- registry


def registry_ok(addr: str, timeout_s: float = 3.0) -> bool:
    return http_ok(f"http://{addr}/v2/", timeout_s)


def start_registry(settings: Settings, port: int = 0) -> str:
    d = _dir(settings, "registry")
    state = d / "addr"
    if state.exists() and registry_ok(state.read_text().strip()) and _pid(d):
        return state.read_text().strip()
    ensure_packages("docker-registry")
    if not port:
        from loraline.server import free_port

        port = free_port()
    addr = f"{HOST}:{port}"
    config = d / "config.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(d / "data")}, "delete": {"enabled": True}},
        "http": {"addr": addr},
    }))
    _spawn(["docker-registry", "serve", str(config)], d)
    state.write_text(addr)
    _wait(lambda: registry_ok(addr), f"the registry on {addr}", d)
    return addr


# --------------------------------------------------------------------------- MLflow server


def mlflow_ok(url: str, timeout_s: float = 3.0) -> bool:
    """Does an MLflow server answer ``GET <url>/health`` with 200?"""
    return http_ok(f"{url}/health", timeout_s)


def _state(settings: Settings, name: str, file: str) -> str | None:
    """The content of ``<home>/services/<name>/<file>`` if it exists (a stat and a read; creates nothing)."""
    try:
        return (settings.home / "services" / name / file).read_text().strip() or None
    except OSError:
        return None


def _mlflow_url(settings: Settings, timeout_s: float = 3.0) -> str | None:
    """The URL of this home's MLflow server if its process is alive and /health answers.

    The pid is checked too: after ``down`` the recorded port may belong to someone else's server.
    """
    url = _state(settings, "mlflow", "url")
    if url is None or _pid(settings.home / "services" / "mlflow") is None:
        return None
    return url if mlflow_ok(url, timeout_s) else None


def start_mlflow(settings: Settings, port: int = 0) -> str:
    """Start ``mlflow/server.sh`` on 127.0.0.1 over ``sqlite:///<home>/mlflow.db``; return its URL.

    Idempotent: a server this home started that still answers is returned as is. The store is the
    same SQLite file loraline writes to without a server, so runs from before and after are in one
    place. Artifacts of experiments created through the server are ``mlflow-artifacts:/`` URIs,
    stored under ``<home>/mlartifacts`` and read back through the server.
    """
    d = _dir(settings, "mlflow")
    running = _mlflow_url(settings)
    if running:
        return running
    if not MLFLOW_SCRIPT.is_file():
        raise ServiceError(f"the MLflow start script {MLFLOW_SCRIPT} is missing: `services up` runs from a loraline "
                           "checkout (git clone; pip install -e .), where it is mlflow/server.sh")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        raise ServiceError(f"no mlflow executable beside {sys.executable}: install loraline's dependencies into this "
                           "environment (pip install -e .)")
    if not port:
        from loraline.server import free_port

        port = free_port()
    url = f"http://{HOST}:{port}"
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{settings.home / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(settings.artifact_root),
        "MLFLOW_HOST": HOST,
        "MLFLOW_PORT": str(port),
        "MLFLOW_BIN": str(mlflow_bin),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }
    _spawn(["bash", str(MLFLOW_SCRIPT)], d, env=env)
    (d / "url").write_text(url)
    _wait(lambda: mlflow_ok(url), f"the MLflow server on {url}", d, timeout_s=MLFLOW_START_TIMEOUT_S)
    return url


# --------------------------------------------------------------------------- Prefect server

PREFECT_START_TIMEOUT_S = 180.0  # the first start migrates its SQLite DB and copies the UI bundle


def prefect_ok(url: str, timeout_s: float = 3.0) -> bool:
    return http_ok(f"{url}/api/health", timeout_s)


def prefect_url(settings: Settings, timeout_s: float = 3.0) -> str | None:
    """The URL of this home's Prefect server if its process is alive and /api/health answers."""
    url = _state(settings, "prefect", "url")
    if url is None or _pid(settings.home / "services" / "prefect") is None:
        return None
    return url if prefect_ok(url, timeout_s) else None


def start_prefect(settings: Settings, port: int = 0) -> str:
    """Start ``prefect server start`` (API + UI) on 127.0.0.1; return its URL (the API is under ``/api``).

    Its database is ``<home>/prefect/prefect.db``, the one loraline's commands use in Prefect's
    ephemeral mode when no server runs, so flow runs from before ``services up`` show in the UI too.
    """
    d = _dir(settings, "prefect")
    running = prefect_url(settings)
    if running:
        return running
    if not port:
        from loraline.server import free_port

        port = free_port()
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
    _spawn([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"],
           d, env=env)
    (d / "url").write_text(url)
    _wait(lambda: prefect_ok(url), f"the Prefect server on {url}", d, timeout_s=PREFECT_START_TIMEOUT_S)
    return url


# --------------------------------------------------------------------------- deployment runner

DEPLOYMENTS = ("release", "benchmark", "image", "trace", "watch")  # flows/serve.py: flow name == deployment name
SERVE_START_TIMEOUT_S = 180.0
REPO = Path(__file__).resolve().parents[2]


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
    return _pid(settings.home / "services" / "serve") is not None


def start_serve(settings: Settings, url: str, env: dict[str, str] | None = None) -> list[str]:
    """Start the runner that creates loraline's deployments on the Prefect server at ``url`` and executes their runs
    (``python -m flows.serve``: the UI's Run button works once it is up). Returns the deployments it serves."""
    d = _dir(settings, "serve")
    want = [f"{n}/{n}" for n in DEPLOYMENTS]
    if serve_running(settings):
        return want
    full = {**os.environ, **(env or {}), "PREFECT_API_URL": f"{url}/api", "LORALINE_HOME": str(settings.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "TOKENIZERS_PARALLELISM": "false"}
    log = d / "log"
    start = log.stat().st_size if log.exists() else 0
    pid = _spawn([sys.executable, "-m", "flows.serve"], d, env=full, cwd=REPO)

    def ready() -> bool:  # the deployments exist and the runner said it polls for runs
        text = log.read_bytes()[start:].decode(errors="replace")
        return "polling" in text and all(w in deployments(url) for w in want)

    _wait(ready, f"the deployment runner (pid {pid}) for {url}", d, timeout_s=SERVE_START_TIMEOUT_S)
    return want


# --------------------------------------------------------------------------- all


def up(settings: Settings) -> ServicesStatus:
    start_docker(settings)
    start_registry(settings)
    start_mlflow(settings)
    url = start_prefect(settings)
    start_serve(settings, url)
    return status(settings)


def status(settings: Settings) -> ServicesStatus:
    host = f"unix://{_short_path(settings) / 'docker.sock'}"  # not docker_host(): status creates nothing
    addr = _state(settings, "registry", "addr")
    dok, rok = docker_ok(host), bool(addr and registry_ok(addr))
    url, purl = _mlflow_url(settings), prefect_url(settings)
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
    if settings.tracking_uri is None and (url := _mlflow_url(settings, timeout_s=2.0)):
        update["tracking_uri"] = url
    if settings.docker_host is None:
        sock = _short_path(settings) / "docker.sock"
        if sock.exists() and docker_ok(f"unix://{sock}", timeout_s=2.0):
            update["docker_host"] = f"unix://{sock}"
    addr = _state(settings, "registry", "addr")
    if (settings.image_registry is None and addr and _pid(settings.home / "services" / "registry")
            and registry_ok(addr, timeout_s=2.0)):
        update["image_registry"] = addr
    return settings.model_copy(update=update) if update else settings


def down(settings: Settings, grace_s: float = 20.0) -> ServicesStatus:
    """Stop what ``up`` started (the deployment runner, Prefect and MLflow first, then the registry, then the engine,
    which stops its containers)."""
    for name in ("serve", "prefect", "mlflow", "registry", "docker"):
        d = settings.home / "services" / name
        pid = _pid(d) if d.exists() else None
        if pid is None:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _pid(d) is not None:
            time.sleep(0.2)
        if _pid(d) is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        (d / "pid").unlink(missing_ok=True)
        if name == "docker":  # dockerd bind-mounts its data root and leaves it (and a netns) mounted
            unmount_under(d, _short_path(settings))
    return status(settings)


def unmount_under(*roots: Path) -> None:
    """Lazily unmount every mount point below ``roots`` (deepest first), so the directories can be removed."""
    prefixes = [str(Path(r).resolve()) for r in roots]
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [ln.split()[4].encode().decode("unicode_escape") for ln in lines]
    for mp in sorted((p for p in points if any(p == r or p.startswith(r + "/") for r in prefixes)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
