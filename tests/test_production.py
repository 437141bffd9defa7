"""The production stack (issue 15), for real: `loraline services up --production` (PostgreSQL, SeaweedFS S3, MLflow on
them, Prefect on PostgreSQL with the work pool `loraline` and two workers), releases submitted with `--submit`, and
what happens when a worker dies, PostgreSQL restarts or the MLflow server restarts mid-release.

The releases are of the tiny demo model (variants of its adapter: different digests) without the benchmark, vLLM
parity or an image, so they take seconds: what is under test here is the stack, not the engine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from configparser import ConfigParser
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import teardown_later

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.production, pytest.mark.docker]  # `up` starts an engine too

LORALINE = str(Path(sys.executable).with_name("loraline"))
LOCKED = re.compile(r"database is locked|deadlock detected|could not serialize access|too many clients", re.I)


def _variants(checkpoint: Path, root: Path, n: int) -> list[Path]:
    """``n`` copies of the demo adapter, LoRA B scaled a little differently: ``n`` digests."""
    from loraline.tiny_models import scaled_adapter

    return [scaled_adapter(checkpoint, root / f"adapter-{i}", 1 + 0.01 * i) for i in range(n)]


def _services(prod: SimpleNamespace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORALINE, "services", *args], env=prod.env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prod(demo_assets) -> SimpleNamespace:
    # A home user postgres can enter when the tests run as root (pytest's temporary directories are 0700).
    root = Path(tempfile.mkdtemp(prefix="loraline-prod-"))
    root.chmod(0o711)
    home = root / "home"
    env = {**os.environ, "LORALINE_HOME": str(home), "LORALINE_BENCH": "false", "LORALINE_VLLM_PARITY": "false",
           "LORALINE_EVAL_EXAMPLES": "4", "LORALINE_IMAGE": "none",
           "LORALINE_CRASH_AFTER_S": "60"}  # the shortest window (two missed heartbeats): the crash test waits it out
    for var in ("DOCKER_HOST", "LORALINE_DOCKER_HOST", "LORALINE_TRACKING_URI", "LORALINE_REGISTRY_URI",
                "LORALINE_IMAGE_REGISTRY", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(var, None)
    ns = SimpleNamespace(root=root, home=home, env=env, base=demo_assets.base,
                         adapters=_variants(demo_assets.checkpoint, root, 4))
    t0 = time.monotonic()
    up = _services(ns, "up", "--production", "--json")
    ns.up_s = time.monotonic() - t0
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        ns.status = json.loads(up.stdout)
        yield ns
    finally:
        def down() -> None:  # 30 s, mostly the services' graceful waits: beside the tests after this module
            proc = _services(ns, "down", "--json")
            subprocess.run(["rm", "-rf", str(root)])
            assert proc.returncode == 0, proc.stderr[-2000:]

        teardown_later("services down (production)", down)


def submit(prod: SimpleNamespace, adapter: Path, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen([LORALINE, "release", "--adapter", str(adapter), "--base", str(prod.base), "--name", name,
                             "--submit", "--json"], env=prod.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 900) -> SimpleNamespace:
    out, err = proc.communicate(timeout=timeout)
    return SimpleNamespace(rc=proc.returncode, json=json.loads(out) if proc.returncode == 0 else None, err=err)


def mlflow_client(prod: SimpleNamespace):  # noqa: ANN201
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=prod.status["mlflow_url"], registry_uri=prod.status["mlflow_url"])


def bucket_keys(prod: SimpleNamespace) -> list[str]:
    """Every object in the stack's bucket, listed with boto3 and the operator's credentials file (not through MLflow)."""
    import boto3

    cp = ConfigParser()
    cp.read(prod.status["s3_credentials_file"])
    s3 = boto3.client("s3", endpoint_url=prod.status["s3_endpoint"], region_name="us-east-1",
                      aws_access_key_id=cp["default"]["aws_access_key_id"],
                      aws_secret_access_key=cp["default"]["aws_secret_access_key"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=prod.status["s3_bucket"])
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _api(prod: SimpleNamespace):  # noqa: ANN202
    import httpx

    return httpx.Client(base_url=f"{prod.status['prefect_url']}/api", timeout=10)


def running_run(prod: SimpleNamespace, name: str, task_prefix: str, timeout_s: float = 300) -> dict:
    """The newest flow run named after release ``name`` or still unnamed, once it runs a task named ``task_prefix``..."""
    deadline = time.monotonic() + timeout_s
    with _api(prod) as c:
        while time.monotonic() < deadline:
            runs = c.post("/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1,
                                                      "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}).json()
            if runs:
                tasks = c.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}).json()
                if any(t["name"].startswith(task_prefix) for t in tasks):
                    return runs[0]
            time.sleep(0.5)
    raise AssertionError(f"no run of {name} reached a {task_prefix} task in {timeout_s} s")


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every process below it (the worker and the run processes it started, whatever their group):
    what a host dying does to them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        children.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def logs_text(prod: SimpleNamespace) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (prod.home / "services").glob("*/log"))


def test_services_up_production_reports_the_stack_and_keeps_its_secrets(prod: SimpleNamespace) -> None:
    st = prod.status
    assert st["stack"] == "production" and st["work_pool"] == "loraline" and st["workers"] == ["worker-1", "worker-2"]
    assert st["running"] == {"docker": True, "registry": True, "postgres": True, "s3": True, "mlflow": True,
                             "prefect": True, "workers": True}
    assert re.fullmatch(r"postgresql://postgres@127\.0\.0\.1:\d+", st["postgres"])
    for url in (st["mlflow_url"], st["prefect_url"], st["s3_endpoint"]):
        assert url.startswith("http://127.0.0.1:"), url
    assert st["s3_bucket"] == "loraline"
    assert oct(Path(st["s3_credentials_file"]).stat().st_mode & 0o777) == "0o600"
    assert st["deployments"] == ["benchmark/benchmark", "image/image", "release/release", "trace/trace", "watch/watch"]
    text = _services(prod, "status").stdout
    assert "work pool: loraline, workers: worker-1, worker-2" in text and f"postgres: {st['postgres']}" in text
    # The stores are PostgreSQL and S3: no SQLite file of the embedded stack appeared.
    assert not (prod.home / "mlflow.db").exists() and not (prod.home / "prefect" / "prefect.db").exists()
    # The deployments came from prefect.yaml on the work pool (no `serve` runner); the watch schedule is paused.
    with _api(prod) as c:
        deps = c.post("/deployments/filter", json={}).json()
    assert {d["work_pool_name"] for d in deps} == {"loraline"}
    assert next(d for d in deps if d["name"] == "watch")["paused"] is True
    assert not (prod.home / "services" / "serve" / "pid").exists()
    # Secrets: on no command line and in no log.
    password = (prod.home / "services" / "postgres" / "password").read_text().strip()
    cp = ConfigParser()
    cp.read(st["s3_credentials_file"])
    secret = cp["default"]["aws_secret_access_key"]
    cmdlines = b"\n".join(p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists())
    assert password.encode() not in cmdlines and secret.encode() not in cmdlines
    logs = logs_text(prod)
    assert "Worker 'worker-1' started" in logs and password not in logs and secret not in logs
    print(f"services up --production: {prod.up_s:.1f} s")


def test_eight_releases_at_once_run_on_both_workers_without_a_locking_error_and_store_artifacts_in_the_bucket(
        prod: SimpleNamespace) -> None:
    """Eight submitted at once, two model names: four adapters under one, three under the other with one of them twice
    (one version per digest). Both workers take runs, no database reports a lock, and every release's records are
    objects in the bucket that a client without S3 keys reads through the MLflow server."""
    a = prod.adapters
    jobs = [("prod-eight-a", x) for x in a] + [("prod-eight-b", x) for x in (a[0], a[1], a[2], a[1])]
    t0 = time.monotonic()
    procs = [submit(prod, adapter, name) for name, adapter in jobs]
    results = [finish(p) for p in procs]
    print(f"eight releases at once: {time.monotonic() - t0:.1f} s")
    for r in results:
        assert r.rc == 0, r.err[-3000:]
    runs = [r.json["flow_run"] for r in results]
    assert all(fr["state"] == "Completed" for fr in runs)
    assert {fr["worker"] for fr in runs} == {"worker-1", "worker-2"}, runs
    assert "on worker worker-" in results[0].err  # the submitter followed the run
    found = LOCKED.findall(logs_text(prod) + "".join(r.err for r in results))
    assert not found, found
    assert len(mlflow_client(prod).search_model_versions("name='prod-eight-a'")) == 4
    # One version per digest: the adapter submitted twice under prod-eight-b has one version.
    b = results[4:]
    by_sha = {r.json["adapter"]["sha256"]: r.json["model_version"] for r in b}
    assert len(by_sha) == 3
    assert b[1].json["model_version"] == b[3].json["model_version"]
    versions = mlflow_client(prod).search_model_versions("name='prod-eight-b'")
    assert sorted(v.tags["loraline.adapter.sha256"] for v in versions) == sorted(by_sha)
    # Each release's records are objects in the bucket (the server proxies them: clients never held the keys).
    keys = set(bucket_keys(prod))
    for r in results:
        run_id = r.json["mlflow_run_id"]
        for f in ("lineage.json", "parity.json", "report.md"):
            assert any(k.endswith(f"/{run_id}/artifacts/{f}") for k in keys), (run_id, f)
    # A client with the tracking URI and no S3 keys reads every artifact through the server; trace works there too.
    run_id = results[0].json["mlflow_run_id"]
    stored = sorted(k.split(f"/{run_id}/artifacts/", 1)[1] for k in keys if f"/{run_id}/artifacts/" in k)
    keyless = {k: v for k, v in prod.env.items() if not k.startswith(("AWS_", "MLFLOW_S3", "LORALINE_S3"))}
    code = ("import sys, mlflow, pathlib; c = mlflow.MlflowClient(sys.argv[1]); d = c.download_artifacts(sys.argv[2], '');"
            "print('\\n'.join(sorted(str(p.relative_to(d)) for p in pathlib.Path(d).rglob('*') if p.is_file())))")
    read = subprocess.run([sys.executable, "-c", code, prod.status["mlflow_url"], run_id], env=keyless,
                          capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-2000:]
    assert read.stdout.split() == stored and "lineage.json" in stored
    trace = subprocess.run([LORALINE, "trace", f"models:/prod-eight-a/{results[0].json['model_version']}", "--json"],
                           env=keyless, capture_output=True, text=True, timeout=300)
    assert trace.returncode == 0, trace.stderr[-2000:]
    assert json.loads(trace.stdout)["adapter"]["sha256"] == results[0].json["adapter"]["sha256"]


def test_a_worker_killed_mid_release_crashes_its_run_and_a_resubmit_completes_on_the_other(prod: SimpleNamespace) -> None:
    adapter = prod.adapters[3]
    proc = submit(prod, adapter, "prod-crash")
    run = running_run(prod, "prod-crash", "merge")
    worker = run["labels"]["prefect.worker.name"]
    killed = kill_tree(int((prod.home / "services" / worker / "pid").read_text()))  # the host died: worker and its runs
    assert len(killed) >= 2, killed
    t0 = time.monotonic()
    crashed = finish(proc)
    print(f"killed {worker} mid-merge; the run was marked Crashed after {time.monotonic() - t0:.1f} s")
    assert crashed.rc == 1 and "ended Crashed" in crashed.err and "no heartbeat" in crashed.err, crashed.err[-2000:]
    client = mlflow_client(prod)
    assert len(client.search_model_versions("name='prod-crash'")) <= 1  # nothing doubled; a re-submit finishes it
    again = finish(submit(prod, adapter, "prod-crash"))
    assert again.rc == 0, again.err[-3000:]
    other = ({"worker-1", "worker-2"} - {worker}).pop()
    assert again.json["flow_run"]["worker"] == other
    assert again.json["evaluation"]["examples"] == 4 and again.json["gate"]["passed"] is False  # no image: gate says so
    versions = client.search_model_versions("name='prod-crash'")
    assert len(versions) == 1 and versions[0].version == again.json["model_version"]
    # `services up` brings the dead worker back.
    st = json.loads(_services(prod, "up", "--json").stdout)
    assert st["workers"] == ["worker-1", "worker-2"] and st["stack"] == "production"


def test_postgres_restarted_while_idle_then_the_next_release_succeeds(prod: SimpleNamespace) -> None:
    from loraline.services import start_postgres, stop_postgres
    from loraline.settings import Settings

    s = Settings(home=prod.home)
    assert stop_postgres(s) is True
    time.sleep(2)
    assert start_postgres(s).server_url() == prod.status["postgres"]
    r = finish(submit(prod, prod.adapters[0], "prod-pg"))
    assert r.rc == 0, r.err[-3000:]
    assert r.json["flow_run"]["state"] == "Completed" and r.json["model_version"] == "1"


def test_mlflow_restarted_mid_release_is_retried_through(prod: SimpleNamespace) -> None:
    from loraline.services.process import stop

    proc = submit(prod, prod.adapters[2], "prod-mlflow")
    running_run(prod, "prod-mlflow", "merge")
    assert stop(prod.home / "services" / "mlflow", 20)
    time.sleep(3)
    st = json.loads(_services(prod, "up", "--json").stdout)
    assert st["mlflow_url"] == prod.status["mlflow_url"]  # same address: the running release reconnects
    r = finish(proc)
    assert r.rc == 0, r.err[-3000:]
    versions = mlflow_client(prod).search_model_versions("name='prod-mlflow'")
    assert [v.version for v in versions] == [r.json["model_version"]]
    assert r.json["evaluation"]["examples"] == 4


def test_the_crash_automation_follows_the_configured_window(prefect_api_url: str) -> None:
    """`services up` keeps one crash automation on the Prefect server, with the window LORALINE_CRASH_AFTER_S asks for:
    an automation with another window is replaced, one with the same window is kept as it is."""
    import httpx

    from loraline.services.work_pool import CRASH_AUTOMATION, ensure_crash_automation

    def automations() -> list[dict]:
        r = httpx.post(f"{prefect_api_url}/automations/filter", json={"automations": {"name": {"any_": [CRASH_AUTOMATION]}}})
        r.raise_for_status()
        return r.json()

    ensure_crash_automation(prefect_api_url.removesuffix("/api"), 90)
    ensure_crash_automation(prefect_api_url.removesuffix("/api"), 60)
    (a,) = automations()
    assert a["trigger"]["within"] == 60 and "60 s" in a["actions"][0]["message"], a
    ensure_crash_automation(prefect_api_url.removesuffix("/api"), 60)
    assert [b["id"] for b in automations()] == [a["id"]]
