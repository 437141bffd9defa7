"""Security (issue 6): secrets from Prefect Secret blocks or the environment, used and never leaked; the registry and
MLflow with real authentication; services bound to 127.0.0.1 only; the image's non-root user and API key.

Real parts only: Debian's docker-registry with an htpasswd file, `mlflow server --app-name basic-auth` (mlflow/server.sh),
the Docker engine of `loraline services up`, Prefect's test harness and its Secret blocks.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import tiny_rootfs

from loraline.errors import ImageError
from loraline.server import free_port
from loraline.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def wait_for(ok, what: str, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not start:\n{log.read_text()[-3000:]}")


def answers(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=3).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture()
def auth_registry(tmp_path: Path):
    """Debian's docker-registry on 127.0.0.1 with htpasswd (bcrypt) basic auth: user `ci`, a random password."""
    import bcrypt

    user, password = "ci", "reg-" + secrets.token_urlsafe(16)
    d = tmp_path / "auth-registry"
    d.mkdir()
    (d / "htpasswd").write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    addr = f"127.0.0.1:{free_port()}"
    (d / "config.yml").write_text(json.dumps({
        "version": 0.1, "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(d / "data")}, "delete": {"enabled": True}},
        "http": {"addr": addr}, "auth": {"htpasswd": {"realm": "loraline-test", "path": str(d / "htpasswd")}},
    }))
    log = d / "log"
    with log.open("w") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(d / "config.yml")], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: answers(f"http://{addr}/v2/") == 401, f"the auth registry on {addr}", log)
        yield addr, user, password
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_registry_credentials_come_from_a_prefect_secret_block(image_services, auth_registry, prefect_harness,
                                                               monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """A registry that wants a password: the push, the manifest read (trace) and the rollback's delete use the one a
    Prefect Secret block holds; without it each is refused with a message that names the settings to set."""
    import docker
    from prefect import flow
    from prefect.blocks.system import Secret

    from loraline_flows.common import flow_settings
    from loraline.image import push
    from loraline.oci import check_registry, delete_manifest, registry_image, registry_manifest

    addr, user, password = auth_registry
    client = docker.DockerClient(base_url=image_services.docker_host, timeout=600)
    repo = f"{addr}/tiny"
    client.api.import_image_from_data(tiny_rootfs(), repository=repo, tag="v1")  # one file: nothing is pulled

    # Anonymous: refused by the registry, and said so.
    with pytest.raises(ImageError, match=r"docker push of 127\.0\.0\.1:\d+/tiny:v1 failed: .*(auth|credentials)"):
        push(client, repo, "v1")
    monkeypatch.setenv("LORALINE_IMAGE_REGISTRY", addr)
    monkeypatch.setenv("LORALINE_REGISTRY_USERNAME", user)
    monkeypatch.setenv("LORALINE_REGISTRY_PASSWORD", "wrong")
    with pytest.raises(ImageError, match=r"refused LORALINE_REGISTRY_USERNAME='ci' and its password \(401\)"):
        check_registry(Settings())
    monkeypatch.delenv("LORALINE_REGISTRY_PASSWORD")

    # The password from the Prefect Secret block `loraline-registry-password`, read where a flow starts.
    Secret(value=password).save("loraline-registry-password", overwrite=True)

    @flow
    def settings_of_a_flow() -> Settings:
        return flow_settings()

    try:
        s = settings_of_a_flow()
    finally:
        Secret.delete("loraline-registry-password")
    assert s.registry_auth == (user, password)
    assert password not in repr(s) and password not in s.model_dump_json()  # SecretStr: masked wherever it is shown
    assert check_registry(s) == addr
    digest, _ = push(client, repo, "v1", auth=s.registry_auth)
    assert registry_manifest(f"{repo}@{digest}", auth=s.registry_auth)[0] == digest
    assert registry_image(f"{repo}:v1", auth=s.registry_auth)["digest"] == digest
    with pytest.raises(ImageError, match=r"wants credentials .* LORALINE_REGISTRY_USERNAME and LORALINE_REGISTRY_PASSWORD"):
        registry_manifest(f"{repo}@{digest}")
    assert delete_manifest(repo, digest) is False  # anonymous delete: refused
    assert delete_manifest(repo, digest, s.registry_auth) is True
    listed = httpx.get(f"http://{addr}/v2/tiny/tags/list", auth=(user, password)).json()
    assert "v1" not in (listed.get("tags") or []), listed
    client.images.remove(f"{repo}:v1", force=True)
    client.close()


@pytest.fixture()
def auth_mlflow(tmp_path: Path):
    """`mlflow/server.sh --app-name basic-auth` on 127.0.0.1: admin `loraline-admin` with a random password."""
    d = tmp_path / "auth-mlflow"
    d.mkdir()
    password = "mlf-" + secrets.token_urlsafe(16)
    ini = d / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{d / 'auth.db'}\n"
                   "admin_username = loraline-admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{d / 'mlflow.db'}", "MLFLOW_ARTIFACTS_DESTINATION": str(d / "artifacts"),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow")),
           "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}  # the auth app's CSRF key: required
    log = d / "log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "server.sh"), "--app-name", "basic-auth"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/health") == 200, f"the MLflow server with basic-auth on {url}", log)
        yield url, "loraline-admin", password, d
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def grep_tree(root: Path, needles: dict[str, str]) -> list[str]:
    """Every file under ``root`` (SQLite databases, logs, artifacts, merged weights...) that holds a needle."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{what} in {p}" for what, value in needles.items() if value.encode() in data]
    return hits


def test_canary_secrets_appear_nowhere_a_release_writes(image_services, auth_mlflow, demo_assets, tmp_path: Path) -> None:
    """A release with every kind of secret set to a canary token: the MLflow password (from a Prefect Secret block, to
    an MLflow server that refuses requests without it), the registry password and the Hugging Face token (from the
    environment). The release succeeds (the secrets were used), and no canary is in its output, its Prefect logs,
    flow-run parameters or artifacts, the MLflow params, tags, descriptions or artifacts, the image's labels, env,
    `docker history` or the layers it pushed."""
    import docker
    from mlflow import MlflowClient

    url, mlflow_user, mlflow_password, mlflow_dir = auth_mlflow
    canaries = {"mlflow password": mlflow_password, "registry password": "reg-" + secrets.token_urlsafe(16),
                "hf token": "hf_" + secrets.token_urlsafe(24)}
    home = tmp_path / "home"
    env = {**os.environ, **image_services.env, "LORALINE_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
           "LORALINE_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": mlflow_user,
           "LORALINE_REGISTRY_USERNAME": "ci", "LORALINE_REGISTRY_PASSWORD": canaries["registry password"],
           "LORALINE_HF_TOKEN": canaries["hf token"], "LORALINE_EVAL_EXAMPLES": "2"}
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    # The base pinned by digest, as production should: the CPU base as the test registry holds it.
    env["LORALINE_IMAGE_BASE"] = base = pinned_base(image_services)
    loraline = str(Path(sys.executable).with_name("loraline"))
    py = str(Path(sys.executable))

    # Without the password, MLflow refuses: the run fails before anything is registered, and says who refused.
    # (Saved to Prefect here, in the same PREFECT_HOME the release's ephemeral Prefect server will use.)
    refused = subprocess.run([loraline, "release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base),
                              "--name", "smol-canary", "--image", "none"], env=env, capture_output=True, text=True, timeout=900)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        "Error: the MLflow server refused the request (401: not authenticated): set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD, or the Prefect Secret block loraline-mlflow-password"), refused.stderr[-3000:]
    save = ("from prefect.blocks.system import Secret; import sys; "
            "Secret(value=sys.stdin.read()).save('loraline-mlflow-password', overwrite=True)")
    # Prefect's ephemeral API server for that PREFECT_HOME: allowed to start as slowly as the CLI allows it (its default
    # is 20 s; the save once exited 1 on a busy box, its stderr hidden, so it is shown now if it fails).
    saved = subprocess.run([py, "-c", save], env={**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"},
                           input=mlflow_password, text=True, capture_output=True, timeout=300)
    assert saved.returncode == 0, saved.stderr[-3000:]

    out = subprocess.run([loraline, "release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base),
                          "--name", "smol-canary", "--image", "merged", "--json", "-v"],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    assert result["image"]["digest"].startswith("sha256:")
    leaks = [f"{what} in the CLI output" for what, v in canaries.items() if v in out.stdout + out.stderr]

    # Everything on disk the release and its services wrote: the loraline home, Prefect's database (logs, flow-run
    # parameters, artifacts, task results), the MLflow server's stores and artifacts.
    for root in (home, tmp_path / "prefect", mlflow_dir):
        leaks += grep_tree(root, canaries)
    for log in Path(image_services.home, "services").glob("*/log"):  # the Docker engine's and the registry's logs
        leaks += [f"{what} in {log}" for what, v in canaries.items() if v.encode() in log.read_bytes()]

    # MLflow, as the API shows it (to the admin): params, run tags, version tags and description, every artifact.
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = mlflow_user, mlflow_password
    try:
        client = MlflowClient(url, url)
        run = client.get_run(result["mlflow_run_id"])
        mv = client.get_model_version("smol-canary", result["model_version"])
        shown = json.dumps([run.data.params, run.data.tags, mv.tags, mv.description, mv.source])
        leaks += [f"{what} in MLflow params/tags" for what, v in canaries.items() if v in shown]
        dl = tmp_path / "artifacts"
        client.download_artifacts(run.info.run_id, "", str(dl))
        assert (dl / "lineage.json").is_file()
        leaks += [f"{h} (downloaded)" for h in grep_tree(dl, canaries)]
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")

    # The image: labels, env, build history, and the bytes of every layer it adds on top of its base.
    dclient = docker.DockerClient(base_url=image_services.docker_host, timeout=600)
    pinned = result["image"]["pinned"]
    history = subprocess.run(["docker", "-H", image_services.docker_host, "history", "--no-trunc", "--format", "{{json .}}",
                              pinned], capture_output=True, text=True, check=True).stdout
    inspect = json.dumps(dclient.images.get(pinned).attrs)
    leaks += [f"{what} in docker history/inspect" for what, v in canaries.items() if v in history + inspect]
    assert "VLLM_API_KEY" not in inspect  # the API key is the container's (docker run -e), never the image's
    reg = image_services.registry
    repo = pinned.split("/", 1)[1].split("@")[0]
    manifest = httpx.get(f"http://{reg}/v2/{repo}/manifests/{result['image']['digest']}",
                         headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                                            "application/vnd.oci.image.manifest.v1+json"}).json()
    base_layers = len(dclient.images.get(image_services.base).attrs["RootFS"]["Layers"])
    ours = manifest["layers"][base_layers:]
    assert ours, manifest
    for layer in ours:
        blob = httpx.get(f"http://{reg}/v2/{repo}/blobs/{layer['digest']}", follow_redirects=True, timeout=120).content
        data = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        leaks += [f"{what} in layer {layer['digest']}" for what, v in canaries.items() if v.encode() in data]
    dclient.close()
    control = tmp_path / "control"
    control.mkdir()
    (control / "x.db").write_bytes(b"\0" + canaries["hf token"].encode() + b"\0")
    assert grep_tree(control, canaries) == [f"hf token in {control / 'x.db'}"]  # the search does find a leak
    assert leaks == [], leaks
    labels = json.loads(inspect)["Config"]["Labels"]
    assert labels["org.opencontainers.image.base.name"] == base
    assert labels["org.opencontainers.image.base.digest"] == base.rsplit("@", 1)[1]
    # The image runs as the non-root user and its smoke test ran with an API key that guarded /v1.
    assert result["images"][0]["smoke"]["v1_status_without_key"] == 401
    assert dclient is not None and json.loads(inspect)["Config"]["User"] == "10001"


def pinned_base(image_services) -> str:
    """``REGISTRY/loraline-vllm-cpu@sha256:...``: the CPU base pushed to the test registry (pushed now if it is not)."""
    import docker

    from loraline.oci import registry_manifest

    repo = f"{image_services.registry}/loraline-vllm-cpu"
    try:
        return f"{repo}@{registry_manifest(f'{repo}:test')[0]}"
    except ImageError:  # a reused services home (LORALINE_TEST_SERVICES_HOME) whose registry lacks it
        client = docker.DockerClient(base_url=image_services.docker_host, timeout=3600)
        client.images.get(image_services.base).tag(repo, "test")
        assert not [e for e in client.api.push(repo, tag="test", stream=True, decode=True) if "error" in e]
        client.close()
        return f"{repo}@{registry_manifest(f'{repo}:test')[0]}"


def listening(port: int) -> list[str]:
    """The local addresses a TCP port listens on (/proc/net/tcp and tcp6: state 0A)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.append(addr)
    return found


def test_services_listen_on_loopback_only(image_services) -> None:
    """`loraline services up`: the MLflow server, the Prefect server and the registry listen on 127.0.0.1, not on every
    interface (the Docker engine listens on a unix socket only)."""
    from urllib.parse import urlparse

    ports = [("mlflow", urlparse(image_services.mlflow_url).port), ("registry", int(image_services.registry.split(":")[1])),
             ("prefect", urlparse(image_services.prefect_url).port)]
    assert image_services.docker_host.startswith("unix://")
    for what, port in ports:
        addrs = listening(port)
        assert addrs == ["0100007F"], (what, port, addrs)  # 127.0.0.1 in /proc/net/tcp's little-endian hex
