"""`loraline services`: a real Docker engine and registry (Debian packages) on this machine, 127.0.0.1 only."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

LORALINE = str(Path(sys.executable).with_name("loraline"))


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORALINE, "services", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LORALINE_HOME": str(home)})


def tiny_rootfs() -> bytes:
    """A one-file root filesystem, so `docker import` makes an image without pulling anything."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"loraline services test\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.slow
def test_services_up_push_pull_by_digest_down(tmp_path: Path) -> None:
    import docker

    home = tmp_path / "home"
    proc = cli("up", "--json", home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    st = json.loads(proc.stdout)
    try:
        assert st["running"] == {"docker": True, "registry": True}
        assert st["docker_host"].startswith("unix:///tmp/loraline-") and st["docker_host"].endswith("/docker.sock")
        host, port = st["registry"].split(":")
        assert host == "127.0.0.1" and int(port) > 0
        # `up` again is a no-op that reports the same services.
        again = json.loads(cli("up", "--json", home=home).stdout)
        assert again["registry"] == st["registry"] and again["docker_host"] == st["docker_host"]

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
    assert json.loads(down.stdout)["running"] == {"docker": False, "registry": False}
    assert json.loads(cli("status", "--json", home=home).stdout)["docker_host"] is None
    # Nothing of the engine stays mounted (dockerd bind-mounts its data root): the home can be removed.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(home.resolve()) not in mounts and st["docker_host"][len("unix://"):-len("/docker.sock")] not in mounts
