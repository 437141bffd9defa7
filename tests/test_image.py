"""The serving image on a real Docker engine and registry (Debian packages, 127.0.0.1), on a CPU vLLM base image
built from Debian packages once per session (tests/conftest.py ``image_services``): build, push, pull by digest, run,
answer like the merged model, trace back from the registry; faults leave no image tag on the model version.

The merged image of a release (build, push, labels, smoke test, served evaluation, the MLflow and Prefect records,
`trace` from the registry) is checked on the real model's release: tests/test_real_model.py."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loraline.settings import Settings
from loraline.tiny_models import scaled_adapter
from helpers import mlflow_state

LORALINE = str(Path(sys.executable).with_name("loraline"))
pytestmark = pytest.mark.slow


def loraline(*args: str, env: dict[str, str], timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORALINE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_runtime_lora_images_share_the_base_layer(image_services, demo_assets, tmp_path: Path, home: Path,
                                                   monkeypatch: pytest.MonkeyPatch, prefect_harness) -> None:
    """--image lora: base layer + adapter layer; the second adapter version on the same base uploads only its small
    layers, and the runtime-LoRA container answers like the merged model."""
    from loraline_flows.release import release

    for k, v in image_services.env.items():
        monkeypatch.setenv(k, v)
    v1 = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name="smol-lora", image="lora")
    img1 = next(i for i in v1["images"] if i["mode"] == "lora")
    assert v1["image"]["ref"].endswith("/smol-lora:v1-lora")
    assert set(img1["smoke"]["served_models"]) == {"smol-lora-base", "smol-lora"}  # the base, and the adapter by name
    # The task evaluation asked the adapter by its served name (runtime LoRA), as a user's client would.
    assert img1["smoke"]["evaluation"]["model"] == "smol-lora" and v1["evaluation"]["served"]["mode"] == "lora"
    for p in img1["smoke"]["parity"].values():
        assert p["failed"] == 0, p

    monkeypatch.setenv("LORALINE_IMAGE_SMOKE", "false")  # the first version proved the mode serves
    other = scaled_adapter(demo_assets.checkpoint, tmp_path / "checkpoint-200", 1.5)
    # The second version is released without an image, then imaged by the stand-alone `image` flow.
    registered = release(adapter=str(other), base=str(demo_assets.base), name="smol-lora", image="none")
    assert registered["model_version"] == "2" and registered["images"] == [] and "image" not in registered
    from loraline_flows.image import image as image_flow

    v2 = image_flow(model="models:/smol-lora/2", mode="lora")
    img2 = next(i for i in v2["images"] if i["mode"] == "lora")
    assert v2["model_version"] == "2" and img2["digest"] != img1["digest"] and v2["image"]["digest"] == img2["digest"]
    from prefect import get_client

    with get_client(sync_client=True) as pc:
        md = next(a for a in pc.read_latest_artifacts() if a.key == "image-smol-lora-lora")
    assert img2["pinned"] in md.data and "uploaded by this push" in md.data

    from loraline.oci import registry_image

    l1, l2 = registry_image(img1["pinned"])["layers"], registry_image(img2["pinned"])["layers"]
    adapter_bytes = sum((other / f).stat().st_size for f in ("adapter_model.safetensors", "adapter_config.json"))
    # Everything up to the base-model layer is shared; what v2 uploaded is its adapter + lineage layers (compressed).
    assert img2["pushed_bytes"] <= 2 * adapter_bytes + 64 * 1024, (img2["pushed_bytes"], adapter_bytes)
    assert img2["pushed_bytes"] < img2["compressed_bytes"] / 100
    assert len(l1) == len(l2) and l1[:-3] == l2[:-3]


class CuttingProxy:
    """A TCP proxy in front of the registry that drops any connection after 64 KiB of upload: a push interrupted
    mid-layer (Docker retries each layer, then gives up)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.split(":")
        self.upstream = (host, int(port))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                sent += len(data)
                if upload and sent > 64 * 1024:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_image_faults_leave_no_image_tag_and_a_rerun_succeeds(image_services, demo_assets, home: Path,
                                                               monkeypatch: pytest.MonkeyPatch, prefect_harness) -> None:
    from loraline_flows.release import release
    from loraline.errors import ImageError
    from loraline.server import free_port

    for k, v in image_services.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LORALINE_IMAGE_SMOKE", "false")
    settings = Settings()
    kw = dict(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name="smol-fault", image="merged")

    # Engine down: refused before anything is merged or registered.
    monkeypatch.setenv("LORALINE_DOCKER_HOST", f"unix://{home}/no-docker.sock")
    with pytest.raises(ImageError, match=r"no Docker engine answers at unix://.*no-docker.sock.*LORALINE_DOCKER_HOST"):
        release(**kw)
    assert mlflow_state(settings)["versions"] == []
    monkeypatch.setenv("LORALINE_DOCKER_HOST", image_services.docker_host)

    # Registry down: refused the same way.
    monkeypatch.setenv("LORALINE_IMAGE_REGISTRY", f"127.0.0.1:{free_port()}")
    with pytest.raises(ImageError, match=r"the image registry 127\.0\.0\.1:\d+ does not answer.*nothing was built or tagged"):
        release(**kw)
    assert mlflow_state(settings)["versions"] == []

    # Push interrupted mid-layer: the version is registered (before the image step) but carries no image tag,
    # is marked failed with the reason, and the registry has no such tag.
    proxy = CuttingProxy(image_services.registry)
    try:
        monkeypatch.setenv("LORALINE_IMAGE_REGISTRY", proxy.addr)
        with pytest.raises(ImageError, match=r"docker push of 127\.0\.0\.1:\d+/smol-fault:v1-merged failed"):
            release(**kw)
        state = mlflow_state(settings)
        assert state["versions"] == [("smol-fault", "1")] and state["running"] == [] and state["aliases"] == []
        from mlflow import MlflowClient

        client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
        tags = client.get_model_version("smol-fault", "1").tags
        assert not [k for k in tags if k.startswith("loraline.image")], tags
        assert tags["loraline.status"] == "failed" and tags["loraline.failed.step"] == "image"
        assert "docker push" in tags["loraline.failed.reason"]
        import httpx

        listed = httpx.get(f"http://{image_services.registry}/v2/smol-fault/tags/list").json()
        assert "v1-merged" not in (listed.get("tags") or [])

    finally:
        proxy.close()

    # Pushed, then recording it in MLflow fails (fault injected in place of an MLflow server going away after the
    # push): the push, the smoke test and the record are one Prefect transaction, and the push's rollback hook deletes
    # the manifest: no tag in the registry that MLflow does not know, no image tag on the version.
    import loraline_flows.image as fi

    real_log_image = fi.log_image

    def record_fails(*a, **k):
        raise RuntimeError("injected fault: MLflow went away after the push")

    monkeypatch.setattr(fi, "log_image", record_fails)
    monkeypatch.setenv("LORALINE_IMAGE_REGISTRY", image_services.registry)
    with pytest.raises(RuntimeError, match="injected fault"):
        release(**kw)
    monkeypatch.setattr(fi, "log_image", real_log_image)
    tags = client.get_model_version("smol-fault", "1").tags
    assert not [k for k in tags if k.startswith("loraline.image")], tags
    assert tags["loraline.status"] == "failed" and tags["loraline.failed.step"] == "image"
    listed = httpx.get(f"http://{image_services.registry}/v2/smol-fault/tags/list").json()
    assert "v1-merged" not in (listed.get("tags") or []), listed
    assert mlflow_state(settings)["aliases"] == []

    # The registry is reachable again (its own address: a push through the proxy's address would upload the base
    # layers again, Docker mounts known blobs only within one registry host): the re-run builds and pushes the image
    # of the same version.
    monkeypatch.setenv("LORALINE_IMAGE_REGISTRY", image_services.registry)
    out = release(**kw)
    assert out["model_version"] == "1" and out["image"]["digest"].startswith("sha256:")
    tags = client.get_model_version("smol-fault", "1").tags
    assert tags["loraline.image.digest"] == out["image"]["digest"] and tags["loraline.status"] == "released"
    assert "loraline.failed.step" not in tags and "loraline.failed.reason" not in tags
    assert mlflow_state(settings)["versions"] == [("smol-fault", "1")]


@pytest.fixture()
def engine_and_registry(tmp_path: Path):
    """A Docker engine and a registry of their own (Debian's dockerd and docker-registry on 127.0.0.1), no base image
    built: seconds to start, stopped at the end."""
    from loraline import services

    s = Settings(home=tmp_path / "services-home")
    try:
        yield services.start_docker(s), services.start_registry(s)
    finally:
        services.down(s)


def test_a_base_image_the_engine_cannot_pull_is_refused_before_any_merge(engine_and_registry, demo_assets, home: Path,
                                                                        prefect_api_url: str, tmp_path: Path) -> None:
    """Issue 13: `--image merged` on a base image nobody can pull failed only at the image build, after the merge,
    the registration and the whole benchmark. Now the preflight asks the engine (image present, or the manifest
    pullable) and the release is refused before anything is merged or registered."""
    import docker

    from loraline.errors import ImageError
    from loraline.image import check_base_image, preflight
    from helpers import tiny_rootfs

    docker_host, registry = engine_and_registry
    missing = f"{registry}/no-such-vllm-base:v0"
    settings = Settings(docker_host=docker_host, image_registry=registry, image_base=missing)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=rf"LORALINE_IMAGE_BASE={re.escape(missing)} is not in the Docker engine and "
                                         r"cannot be pulled .*docker/base-cpu/build\.sh REF"):
        preflight(settings, "merged")
    assert time.perf_counter() - t0 < 15  # the registry's answer, not a pull or a timeout

    # A base the engine has passes, and one only the registry has passes without being pulled.
    client = docker.DockerClient(base_url=docker_host)
    try:
        client.api.import_image_from_data(tiny_rootfs(), repository=f"{registry}/tiny-base", tag="v1")
        assert check_base_image(client, f"{registry}/tiny-base:v1") == "present"
        assert not [e for e in client.images.push(f"{registry}/tiny-base", tag="v1", stream=True, decode=True) if "error" in e]
        client.images.remove(f"{registry}/tiny-base:v1")
        assert check_base_image(client, f"{registry}/tiny-base:v1") == "pullable"
        assert not client.images.list(name=f"{registry}/tiny-base")  # nothing was pulled
    finally:
        client.close()

    # The release, as a user runs it: refused with the setting and the fix named, nothing merged, nothing registered.
    env = {**os.environ, "LORALINE_HOME": str(home), "LORALINE_DOCKER_HOST": docker_host,
           "LORALINE_IMAGE_REGISTRY": registry, "LORALINE_IMAGE_BASE": missing, "PREFECT_API_URL": prefect_api_url}
    proc = loraline("release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base),
                    "--name", "no-base", "--image", "merged", env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"LORALINE_IMAGE_BASE={missing} is not in the Docker engine" in proc.stderr
    assert "nothing was merged or registered" in proc.stderr
    assert not list((home / "merged").glob("*"))
    assert mlflow_state(Settings(home=home))["versions"] == []
