"""`loraline services`: a real Docker engine, registry (Debian packages) and MLflow server on this machine, 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_rootfs

LORALINE = str(Path(sys.executable).with_name("loraline"))
pytestmark = pytest.mark.docker


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORALINE, "services", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LORALINE_HOME": str(home)})


@pytest.mark.slow
def test_services_up_push_pull_by_digest_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import docker
    import httpx
    from mlflow import MlflowClient

    from loraline.services import configured
    from loraline.settings import Settings

    # Settings and the CLI must see only what the services provide, not this machine's environment.
    for var in ("DOCKER_HOST", "LORALINE_DOCKER_HOST", "LORALINE_TRACKING_URI", "LORALINE_REGISTRY_URI",
                "LORALINE_IMAGE_REGISTRY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    home = tmp_path / "home"
    assert configured(Settings(home=home)) == Settings(home=home)  # nothing runs: unchanged
    proc = cli("up", "--json", home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    st = json.loads(proc.stdout)
    try:
        assert st["running"] == {"docker": True, "registry": True, "mlflow": True, "prefect": True, "deployments": True}
        # The runner serves loraline's deployments on that Prefect server (the UI's Run button executes them).
        assert st["deployments"] == ["benchmark/benchmark", "image/image", "release/release", "trace/trace", "watch/watch"]
        assert st["docker_host"].startswith("unix:///tmp/loraline-") and st["docker_host"].endswith("/docker.sock")
        host, port = st["registry"].split(":")
        assert host == "127.0.0.1" and int(port) > 0
        url = st["mlflow_url"]
        assert url.startswith("http://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        purl = st["prefect_url"]
        assert purl.startswith("http://127.0.0.1:") and httpx.get(f"{purl}/api/health", timeout=5).json() is True
        # The Prefect UI is served, and it talks to this server's API (not the default port 4200).
        assert httpx.get(f"{purl}/", timeout=10).status_code == 200
        assert httpx.get(f"{purl}/ui-settings", timeout=5).json()["api_url"] == f"{purl}/api"
        assert (home / "prefect" / "prefect.db").exists()
        # `up` again is a no-op that reports the same services.
        again = json.loads(cli("up", "--json", home=home).stdout)
        assert (again["registry"], again["docker_host"], again["mlflow_url"], again["prefect_url"]) == (
            st["registry"], st["docker_host"], url, purl)
        status_text = cli("status", home=home).stdout
        assert f"mlflow: {url} (UI; export MLFLOW_TRACKING_URI={url})" in status_text
        assert f"prefect: {purl} (UI; export PREFECT_API_URL={purl}/api)" in status_text
        assert f"deployments: benchmark/benchmark, image/image, release/release, trace/trace, watch/watch (Run in the UI: {purl}/deployments)" in status_text
        runner_pid = int((home / "services" / "serve" / "pid").read_text())

        # Through the server: an experiment and a run with an artifact, stored under <home>/mlartifacts (served).
        server = MlflowClient(tracking_uri=url, registry_uri=url)
        exp_id = server.create_experiment("svc-test")
        run = server.create_run(exp_id)
        (tmp_path / "note.txt").write_text("logged through the MLflow server\n")
        server.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        server.set_terminated(run.info.run_id)
        assert [f.path for f in server.list_artifacts(run.info.run_id)] == ["note.txt"]
        on_disk = home / "mlartifacts" / exp_id / run.info.run_id / "artifacts" / "note.txt"
        assert on_disk.read_text() == "logged through the MLflow server\n"
        # ... and in the same SQLite store loraline uses without a server.
        db = f"sqlite:///{home.resolve() / 'mlflow.db'}"
        local = MlflowClient(tracking_uri=db, registry_uri=db)
        exp = local.get_experiment_by_name("svc-test")
        assert exp is not None and exp.experiment_id == exp_id
        assert local.get_run(run.info.run_id).info.status == "FINISHED"

        # Unset settings are filled from the running services; set ones are kept.
        conf = configured(Settings(home=home))
        assert (conf.tracking_uri, conf.docker_host, conf.image_registry) == (url, st["docker_host"], st["registry"])
        assert conf.resolved_registry_uri == url
        assert configured(Settings(home=home, tracking_uri=db)).tracking_uri == db

        client = docker.DockerClient(base_url=st["docker_host"])
        resp = client.api.import_image_from_data(tiny_rootfs(), repository=f"{st['registry']}/svc-test", tag="v1")
        assert "sha256:" in str(resp)
        pushed = list(client.images.push(f"{st['registry']}/svc-test", tag="v1", stream=True, decode=True))
        assert not [e for e in pushed if "error" in e], pushed
        digest = next(e["aux"]["Digest"] for e in pushed if "aux" in e)
        client.images.remove(f"{st['registry']}/svc-test:v1")
        pulled = client.images.pull(f"{st['registry']}/svc-test@{digest}")
        assert f"{st['registry']}/svc-test@{digest}" in pulled.attrs["RepoDigests"]
        client.close()
    finally:
        down = cli("down", "--json", home=home)
    assert down.returncode == 0, down.stderr[-2000:]
    assert json.loads(down.stdout)["running"] == {"docker": False, "registry": False, "mlflow": False, "prefect": False,
                                                  "deployments": False}
    with pytest.raises(ProcessLookupError):  # the runner is gone too
        os.kill(runner_pid, 0)
    after = json.loads(cli("status", "--json", home=home).stdout)
    assert after["docker_host"] is None and after["registry"] is None and after["mlflow_url"] is None
    assert after["prefect_url"] is None
    for stopped in (f"{url}/health", f"{purl}/api/health"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(stopped, timeout=5)
    conf = configured(Settings(home=home))
    assert (conf.tracking_uri, conf.docker_host, conf.image_registry) == (None, None, None)
    # Nothing of the engine stays mounted (dockerd bind-mounts its data root): the home can be removed.
    mounts = Path("/proc/self/mountinfo").read_text()
    short = st["docker_host"][len("unix://"):-len("/docker.sock")]
    assert str(home.resolve()) not in mounts and short not in mounts
    assert not Path(short).exists()  # `down` removed the engine's socket and exec root; `status` made none
