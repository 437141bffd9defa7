"""The image registry: Debian's ``docker-registry`` (the CNCF distribution registry) with a filesystem store under
``<home>/services/registry/data``, bound to ``127.0.0.1:<port>`` (recorded in ``<home>/services/registry/addr``)."""

from __future__ import annotations

import json

from loraline.probe import http_ok
from loraline.services.process import HOST, alive_pid, ensure_packages, service_dir, service_port, spawn, wait_up
from loraline.settings import Settings


def registry_ok(addr: str, timeout_s: float = 3.0) -> bool:
    return http_ok(f"http://{addr}/v2/", timeout_s)


def start_registry(settings: Settings, port: int = 0) -> str:
    d = service_dir(settings, "registry")
    state = d / "addr"
    if state.exists() and registry_ok(state.read_text().strip()) and alive_pid(d):
        return state.read_text().strip()
    ensure_packages("docker-registry")
    port = port or service_port(d, "addr")
    addr = f"{HOST}:{port}"
    config = d / "config.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(d / "data")}, "delete": {"enabled": True}},
        "http": {"addr": addr},
    }))
    spawn(["docker-registry", "serve", str(config)], d)
    state.write_text(addr)
    wait_up(lambda: registry_ok(addr), f"the registry on {addr}", d)
    return addr
