"""Helpers the test modules share (plain functions and constants; fixtures live in conftest.py). A test module imports
from here, never from another test module."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Callable

from loraline.settings import Settings

LORALINE = str(Path(sys.executable).with_name("loraline"))
LATER: list[threading.Thread] = []
LATER_ERRORS: list[str] = []


def teardown_later(what: str, stop: Callable[[], object]) -> None:
    """Run a module fixture's teardown that is mostly waiting (stopping services gracefully: the object store's 17 s,
    `services down` of the production stack's 30 s) in a thread, beside the tests after it. tests/conftest.py's
    pytest_sessionfinish waits for every one and fails the session with ``what`` if one raised."""
    def run() -> None:
        try:
            stop()
        except BaseException as e:  # noqa: BLE001 - reported at the session's end
            LATER_ERRORS.append(f"{what}: {type(e).__name__}: {e}")

    t = threading.Thread(target=run, name=f"teardown {what}", daemon=True)
    t.start()
    LATER.append(t)


def mlflow_state(settings: Settings) -> dict[str, object]:
    """What a failed release must not leave behind: versions, aliases, RUNNING runs."""
    from mlflow import MlflowClient

    if not (settings.home / "mlflow.db").exists():
        return {"versions": [], "aliases": [], "running": []}
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    versions = client.search_model_versions("")
    aliases = sorted(a for m in client.search_registered_models() for a in (m.aliases or {}))
    exps = [e.experiment_id for e in client.search_experiments()]
    running = [r.info.run_id for r in client.search_runs(exps, "attributes.status = 'RUNNING'")] if exps else []
    return {"versions": [(v.name, str(v.version)) for v in versions], "aliases": aliases, "running": running}


def adapter_version(src: Path, dst: Path) -> Path:
    """Another version of an adapter: a copy with one LoRA B entry nudged by 1e-3 (a new digest, the same behaviour)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(str(dst / "adapter_model.safetensors"))
    k = next(k for k in sorted(t) if "lora_B" in k)
    t[k][0, 0] += 1e-3
    save_file(t, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# A benchmark workload small enough for CI on 2 cores (every path, two server levels, two repeats).
SMALL_BENCH = {
    "LORALINE_BENCH_INPUT_LEN": "16",
    "LORALINE_BENCH_OUTPUT_LEN": "8",
    "LORALINE_BENCH_PROMPTS": "4",
    "LORALINE_BENCH_REPEATS": "2",
    "LORALINE_BENCH_CONCURRENCY": "[1,4]",
    "LORALINE_BENCH_SERVER_MIN_REQUESTS": "4",
}


COREUTILS = r"""cd "$1" && find -L . -type f | sed 's|^./||' | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -d' ' -f1"""


def coreutils_digest(path: Path) -> str:
    return subprocess.run(["bash", "-c", COREUTILS, "_", str(path)], check=True, capture_output=True, text=True).stdout.strip()


def tiny_rootfs() -> bytes:
    """A one-file root filesystem, so `docker import` makes an image without pulling anything."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"loraline services test\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def smoke_containers(docker_host: str) -> list[str]:
    import docker

    client = docker.DockerClient(base_url=docker_host)
    try:
        return [c.name for c in client.containers.list(all=True, filters={"label": "org.loraline.smoke"})]
    finally:
        client.close()


def loraline(*args: str, home: Path, prefect_api_url: str | None = None, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``loraline ARGS`` as a user's shell runs it: a process of its own on ``home``, no benchmark and no vLLM parity
    unless ``extra_env`` asks. Its flow runs go to ``prefect_api_url`` (the session's Prefect server: fixture
    ``prefect_api_url``), as a shell with PREFECT_API_URL exported sends them; without it Prefect runs ephemeral, as in
    a plain shell (a Prefect server started and migrated for the one command: about 20 s, 15 CPU-s here)."""
    env = {**os.environ, "LORALINE_HOME": str(home), "LORALINE_BENCH": "false", **extra_env}
    for k in [k for k in env if k.startswith("PREFECT_")]:
        env.pop(k)  # a user's shell: none of the test session's Prefect settings
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if prefect_api_url:
        env["PREFECT_API_URL"] = prefect_api_url
    env.setdefault("LORALINE_VLLM_PYTHON", str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"))
    # vLLM parity off: tests/test_engine.py covers it on this model, the real model's CLI release at its default (on).
    env["LORALINE_VLLM_PARITY"] = extra_env.get("LORALINE_VLLM_PARITY", "false")
    return subprocess.run([LORALINE, *args], capture_output=True, text=True, env=env, timeout=900)
