"""vLLM's OpenAI-compatible server as a context manager, in the engine environment.

``with serve_openai(model_dir, settings, served_model_name="m") as server:`` starts
``$LORALINE_VLLM_PYTHON -m vllm.entrypoints.openai.api_server`` (or ``vllm serve``: ``frontend="serve"``, which takes
``--api-server-count``) on 127.0.0.1 in its own process group, logging to a file, waits until ``GET /health`` answers 200, and on leaving the block
always stops the whole group (SIGTERM, then SIGKILL). A server that dies or does not come up in
time raises :class:`~loraline.errors.EngineError` with the last lines of its log.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraline.engine import require_dir, default_engine_args, engine_env, find_engine
from loraline.errors import EngineError
from loraline.probe import http_ok, wait_until
from loraline.services.process import kill_group
from loraline.settings import Settings

HOST = "127.0.0.1"  # never another interface: the test server has no auth
# How the server is started: vLLM's OpenAI server module (one API process), or the ``vllm serve`` command, whose
# ``--api-server-count N`` puts N API processes in front of one engine (benchmarks/serve_tuning.py).
FRONTENDS = {
    "api_server": ("-m", "vllm.entrypoints.openai.api_server", "--model"),
    "serve": ("-m", "vllm.entrypoints.cli.main", "serve"),
}
STOP_GRACE_S = 20.0


@dataclass(frozen=True)
class Server:
    """A running OpenAI-compatible vLLM server."""

    url: str  # http://127.0.0.1:PORT, no trailing slash; the OpenAI API is under url + "/v1"
    served_model_name: str
    log_path: Path
    pid: int
    port: int
    ready_s: float = 0.0  # process start -> /health answered 200


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_args(engine_args: Mapping[str, Any]) -> list[str]:
    """``LLM(...)`` keyword arguments as ``vllm serve`` flags (``True`` -> ``--flag``, ``False``/``None`` -> omitted)."""
    out: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


@contextmanager
def serve_openai(
    model_dir: Path,
    settings: Settings,
    *,
    served_model_name: str,
    lora_modules: Mapping[str, Path] | None = None,
    max_lora_rank: int | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    frontend: str = "api_server",
) -> Iterator[Server]:
    """Serve ``model_dir`` (plus runtime LoRA ``lora_modules``: name -> adapter dir) until the block ends.

    The log goes to ``<home>/logs/vllm-server-*.log`` and is kept after the server stops.
    Waits at most ``settings.engine_timeout_s`` for ``/health``.
    """

    require_dir(model_dir, "config.json", "model")
    for path in (lora_modules or {}).values():
        require_dir(path, "adapter_config.json", "LoRA adapter")
    engine = find_engine(settings)
    port = port or free_port()
    engine_args = default_engine_args(engine, settings, model_dir)
    cmd = [
        str(engine.python), *FRONTENDS[frontend], str(Path(model_dir).resolve()),
        "--host", HOST,
        "--port", str(port),
        "--served-model-name", served_model_name,
        *server_args(engine_args),
    ]  # fmt: skip
    if lora_modules:
        if max_lora_rank is None:
            raise EngineError(f"serving LoRA modules {sorted(lora_modules)} needs max_lora_rank (see engine.vllm_lora_rank)")
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--lora-modules"]
        cmd += [f"{name}={Path(path).resolve()}" for name, path in lora_modules.items()]
    cmd += list(extra_args)

    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.mkstemp(prefix=f"vllm-server-{port}-", suffix=".log", dir=logs)[1])
    url = f"http://{HOST}:{port}"
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=engine_env(settings, engine),
            start_new_session=True,  # one group: the API process and its engine core stop together
        )
    try:
        _wait_healthy(proc, url, log_path, settings.engine_timeout_s)
        yield Server(url=url, served_model_name=served_model_name, log_path=log_path, pid=proc.pid, port=port,
                     ready_s=round(time.perf_counter() - t0, 3))
    finally:
        kill_group(proc, grace_s=STOP_GRACE_S)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float) -> None:
    """Poll ``/health`` until 200; fail early when the process exits, or after ``timeout_s``."""
    w = wait_until(lambda: http_ok(url + "/health", 2.0), timeout_s,
                   gone=lambda: None if proc.poll() is None else f"exited with status {proc.returncode}")
    if w.gone:
        raise EngineError(
            f"the vLLM server for {url} {w.gone} before it was healthy; full log: {log_path}\n"
            f"--- server log (last lines) ---\n{log_tail(log_path)}"
        )
    if not w.ready:
        raise EngineError(
            f"the vLLM server for {url} was not healthy within {timeout_s:.0f}s; raise LORALINE_ENGINE_TIMEOUT_S "
            f"if the machine is slow; full log: {log_path}\n--- server log (last lines) ---\n{log_tail(log_path)}"
        )


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"(log unreadable: {e})"
    return "\n".join(text.rstrip().splitlines()[-lines:])
