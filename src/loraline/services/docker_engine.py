"""The Docker engine: Debian's ``dockerd`` (package ``docker.io``) listening on a unix socket, without iptables or a
bridge (containers use ``--network host``). Its data root is ``<home>/services/docker/data``; its socket and exec root
live under a short path (:func:`short_path`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from loraline.errors import ServiceError
from loraline.services.process import ensure_packages, service_dir, spawn, wait_up
from loraline.settings import Settings


def short_path(settings: Settings) -> Path:
    """Sockets live under a short path (unix socket paths are limited to 107 bytes): /tmp/loraline-<hash of home>."""
    return Path("/tmp") / f"loraline-{hashlib.sha256(str(settings.home).encode()).hexdigest()[:12]}"


def short_dir(settings: Settings) -> Path:
    """:func:`short_path`, created (mode 0700) if missing."""
    d = short_path(settings)
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def docker_host(settings: Settings) -> str:
    return f"unix://{short_dir(settings) / 'docker.sock'}"


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
    d = service_dir(settings, "docker")
    host = docker_host(settings)
    if docker_ok(host):
        return host
    ensure_packages("dockerd")
    short = short_dir(settings)
    (short / "docker.sock").unlink(missing_ok=True)
    cmd = ["dockerd", "--storage-driver=overlay2", "--iptables=false", "--ip-masq=false", "--bridge=none",
           f"--data-root={d / 'data'}", f"--exec-root={short / 'exec'}", f"--pidfile={d / 'dockerd.pid'}",
           "-H", host]
    spawn(cmd, d)
    wait_up(lambda: docker_ok(host), "the Docker engine", d)
    return host
