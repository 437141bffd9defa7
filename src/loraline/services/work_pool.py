"""The production stack's Prefect work pool and workers (issue 15): a ``process`` work pool :data:`WORK_POOL`,
loraline's deployments created the production way (``prefect deploy --all`` from the packaged ``prefect.yaml``), and
:data:`WORKERS` (``prefect worker start --pool loraline --limit 2``), each a service under ``<home>/services/<name>/``.

Everything goes through Prefect's own command line in subprocesses (this library never imports prefect). A worker
forwards the first SIGTERM to its runs and keeps polling (seen: an idle 3.8.8 worker still ran 60 s later); the second
stops it, so :func:`stop_workers` signals twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import as_file, files
from pathlib import Path

from loraline.errors import ServiceError
from loraline.services.process import alive_pid, service_dir, spawn, stop_together, wait_up
from loraline.settings import Settings

WORK_POOL = "loraline"
WORKERS = ("worker-1", "worker-2")
WORKER_LIMIT = 2  # runs per worker at once: without a limit one worker takes every run of a poll
PREFECT_YAML = files("loraline") / "data" / "prefect" / "prefect.yaml"
WATCH_SETTINGS = ("LORALINE_WATCH_BASE", "LORALINE_WATCH_EXPERIMENT")
# A run whose worker or host dies stays Running on the server; with heartbeats from every run and this automation
# (Prefect's own recipe, "detect zombie flows") the server marks it Crashed once no heartbeat came for
# ``settings.crash_after_s`` seconds (90 by default).
HEARTBEAT_S = 30  # Prefect's minimum
CRASH_AUTOMATION = "loraline: crash flow runs without a heartbeat"


def _prefect(args: list[str], url: str, what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    full = {**os.environ, **(env or {}), "PREFECT_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1"}
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=600)
    if proc.returncode != 0:
        raise ServiceError(f"{what} failed (prefect {' '.join(args)}):\n{(proc.stdout + proc.stderr).strip()[-2000:]}")
    return proc.stdout


def _api(url: str):  # noqa: ANN202 - an httpx client on the Prefect API
    import httpx

    return httpx.Client(base_url=f"{url}/api", timeout=10)


def ensure_work_pool(url: str) -> None:
    """Create the ``process`` work pool unless the server has it."""
    with _api(url) as c:
        if c.get(f"/work_pools/{WORK_POOL}").status_code == 200:
            return
    _prefect(["work-pool", "create", WORK_POOL, "--type", "process"], url, f"creating the work pool {WORK_POOL!r}")


def ensure_crash_automation(url: str, after_s: int) -> None:
    """Create :data:`CRASH_AUTOMATION` (a run with no heartbeat for ``after_s`` seconds is marked Crashed) unless the
    server has it with that window; one with another window is replaced."""
    with _api(url) as c:
        have = c.post("/automations/filter", json={"automations": {"name": {"any_": [CRASH_AUTOMATION]}}})
        have.raise_for_status()
        for old in have.json():
            if old.get("trigger", {}).get("within") == after_s:
                return
            c.delete(f"/automations/{old['id']}").raise_for_status()
        c.post("/automations/", json={
            "name": CRASH_AUTOMATION, "enabled": True,
            "description": f"A flow run that sent no heartbeat for {after_s} s (its worker or host died) is marked Crashed.",
            "trigger": {"type": "event", "posture": "Proactive", "after": ["prefect.flow-run.heartbeat"],
                        "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                                   "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"],
                        "match": {"prefect.resource.id": ["prefect.flow-run.*"]}, "for_each": ["prefect.resource.id"],
                        "threshold": 1, "within": after_s},
            "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                         "message": f"no heartbeat for {after_s} s: its worker or host died"}],
        }).raise_for_status()


def deploy(settings: Settings, url: str) -> list[str]:
    """``prefect deploy --all`` from the packaged prefect.yaml; the watch deployment's schedule is paused unless a watch
    source is set (else it would start a failing run every interval). Returns ``flow/deployment`` names."""
    d = service_dir(settings, "deploy")
    env = {"LORALINE_HOME": str(settings.home.resolve())}
    with as_file(PREFECT_YAML) as spec:
        _prefect(["deploy", "--all", "--prefect-file", str(spec)], url, "deploying loraline's flows", env=env, cwd=d)
    from loraline.services.prefect_server import deployments

    names = deployments(url)
    if not any(os.environ.get(v) for v in WATCH_SETTINGS):
        with _api(url) as c:
            for dep in c.post("/deployments/filter", json={"deployments": {"name": {"any_": ["watch"]}}}).json():
                c.patch(f"/deployments/{dep['id']}", json={"paused": True}).raise_for_status()
    return names


def workers_running(settings: Settings) -> list[str]:
    return [w for w in WORKERS if alive_pid(settings.home / "services" / w) is not None]


def start_workers(settings: Settings, url: str, env: dict[str, str] | None = None,
                  names: tuple[str, ...] = WORKERS) -> list[str]:
    """Start the workers (``names``, default all) that are not running; wait until each polls the pool. Returns
    ``names``."""
    full = {**os.environ, **(env or {}), "PREFECT_API_URL": f"{url}/api", "LORALINE_HOME": str(settings.home.resolve()),
            "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "TOKENIZERS_PARALLELISM": "false"}
    started = []
    for name in names:
        d = service_dir(settings, name)
        if alive_pid(d) is None:
            spawn([sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--name", name, "--type",
                   "process", "--limit", str(WORKER_LIMIT), "--install-policy", "never"], d, env=full, cwd=d)
            started.append(name)
    for name in started:
        wait_up(lambda n=name: n in pool_workers(url), f"the Prefect worker {name} of pool {WORK_POOL!r}",
                settings.home / "services" / name, timeout_s=120)
    return list(names)


def pool_workers(url: str) -> list[str]:
    """Names of the workers the server has seen polling the pool recently (status ONLINE)."""
    import httpx

    try:
        with _api(url) as c:
            rows = c.post(f"/work_pools/{WORK_POOL}/workers/filter", json={}).json()
        return sorted(r["name"] for r in rows if r.get("status") == "ONLINE")
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


def stop_workers(settings: Settings, grace_s: float = 15.0) -> bool:
    """Stop the workers (and the runs they started): SIGTERM, then SIGTERM again after 2 s. True when any ran."""
    dirs = [settings.home / "services" / w for w in WORKERS]
    return any(stop_together(dirs, grace_s, again_after_s=2.0))
