"""OpenAI-compatible servers as context managers: vLLM's, and llama-cpp-python's, each in its own environment.

``with serve_openai(model_dir, settings, served_model_name="m") as server:`` starts
``$LORALINE_VLLM_PYTHON -m vllm.entrypoints.openai.api_server`` (or ``vllm serve``: ``frontend="serve"``, which takes
``--api-server-count``) on 127.0.0.1; ``with serve_llama(gguf_file, settings, served_model_name="m") as server:`` starts
``$LORALINE_LLAMA_PYTHON -m llama_cpp.server`` on a GGUF file. Both go through :func:`serve_process`: the server runs in
its own process group, logging to a file; the wait ends at the first 200 from its readiness URL (vLLM ``/health``,
llama.cpp ``/v1/models``: llama-cpp-python loads the model before it listens, so any answer means ready); the group's
resident memory is sampled while it runs (:class:`~loraline.services.process.PeakRss`); leaving the block always stops
the whole group (SIGTERM, then SIGKILL). A server that dies or does not come up in time raises
:class:`~loraline.errors.EngineError` with the last lines of its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraline.engine import require_dir, default_engine_args, engine_env, find_engine
from loraline.errors import EngineError
from loraline.probe import http_ok, wait_until
from loraline.services.process import PeakRss, kill_group
from loraline.settings import Settings

HOST = "127.0.0.1"  # never another interface: the test server has no auth
# How the server is started: vLLM's OpenAI server module (one API process), or the ``vllm serve`` command, whose
# ``--api-server-count N`` puts N API processes in front of one engine (benchmarks/serve_tuning.py).
FRONTENDS = {
    "api_server": ("-m", "vllm.entrypoints.openai.api_server", "--model"),
    "serve": ("-m", "vllm.entrypoints.cli.main", "serve"),
}
STOP_GRACE_S = 20.0
READY_POLL_S = 0.1  # how often readiness is asked: the resolution of ``ready_s`` (llama.cpp is ready in ~1 s)
# llama-cpp-python's server settings are pydantic BaseSettings (every field also read from an environment variable of
# its name) and uvicorn takes HOST/PORT from the environment over the flags: none of these may leak into it.
_LLAMA_ENV_DROP = ("HOST", "PORT", "API_KEY", "MODEL", "CONFIG_FILE", "MODEL_ALIAS", "N_CTX", "N_THREADS")


@dataclass(frozen=True)
class Server:
    """A running OpenAI-compatible server (vLLM or llama.cpp)."""

    url: str  # http://127.0.0.1:PORT, no trailing slash; the OpenAI API is under url + "/v1"
    served_model_name: str
    log_path: Path
    pid: int
    port: int
    ready_s: float = 0.0  # process spawned -> its readiness URL answered 200
    memory: PeakRss | None = field(default=None, compare=False)  # the group's RSS, sampled until the server stops

    def memory_report(self) -> dict[str, Any]:
        """Peak RSS of the server's process group (final once the block has ended): :meth:`PeakRss.to_dict`."""
        return self.memory.to_dict() if self.memory is not None else {}


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

    yield from _serve(cmd, engine_env(settings, engine), settings, what="the vLLM server", log_prefix="vllm-server",
                      ready_path="/health", served_model_name=served_model_name, port=port)


@contextmanager
def serve_llama(gguf_file: Path, settings: Settings, *, served_model_name: str, n_ctx: int = 2048,
                threads: int | None = None, port: int | None = None, extra_args: Sequence[str] = ()) -> Iterator[Server]:
    """Serve a GGUF file with llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``, from the
    llama.cpp environment: :func:`loraline.llama_engine.find_llama`) until the block ends.

    Sharp edge: llama-cpp-python serves **one request at a time** (one ``Llama`` behind a lock; its settings have no
    parallel slots), so concurrent requests queue: their TTFT includes the wait. Flags set here, and why:
    ``--interrupt_requests false`` (its default true ends a streaming request early whenever another one is waiting:
    at concurrency > 1 outputs would be cut short), ``--logits_all false`` (its default true keeps the logits of every
    prompt position: ``n_ctx x vocab`` floats, 0.4 GB for a 49k vocabulary at 2048, that nothing here reads),
    ``--n_threads``/``--n_threads_batch`` = ``threads`` (default: every core; its own default is half of them),
    ``--verbose false``. The log goes to ``<home>/logs/llama-server-*.log``.
    """
    from loraline.llama_engine import find_llama

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise EngineError(f"no GGUF file at {gguf_file}; export one with `loraline release --gguf f16` (or pass a .gguf path)")
    llama = find_llama(settings)
    port = port or free_port()
    threads = threads or os.cpu_count() or 1
    cmd = [
        str(llama.python), "-m", "llama_cpp.server", "--model", str(gguf_file.resolve()),
        "--model_alias", served_model_name, "--host", HOST, "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--interrupt_requests", "false", "--logits_all", "false", "--verbose", "false", *extra_args,
    ]  # fmt: skip
    env = {k: v for k, v in engine_env(settings, None).items() if k.upper() not in _LLAMA_ENV_DROP}
    yield from _serve(cmd, env, settings, what="the llama.cpp server", log_prefix="llama-server", ready_path="/v1/models",
                      served_model_name=served_model_name, port=port)


def _serve(cmd: Sequence[str], env: Mapping[str, str], settings: Settings, *, what: str, log_prefix: str, ready_path: str,
           served_model_name: str, port: int) -> Iterator[Server]:
    """The part every server shares: spawn ``cmd`` in its own process group (log to a file), sample its memory, wait for
    ``ready_path`` to answer 200, yield the :class:`Server`, and always stop the whole group."""
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.mkstemp(prefix=f"{log_prefix}-{port}-", suffix=".log", dir=logs)[1])
    url = f"http://{HOST}:{port}"
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,  # one group: the API process and its engine core stop together
        )
    memory = PeakRss(proc.pid)
    try:
        _wait_ready(proc, url, ready_path, what, log_path, settings.engine_timeout_s)
        ready_s = round(time.perf_counter() - t0, 3)
        yield Server(url=url, served_model_name=served_model_name, log_path=log_path, pid=proc.pid, port=port,
                     ready_s=ready_s, memory=memory)
    finally:
        memory.stop()  # before the kill: the last sample and each process's own peak are read from the live group
        kill_group(proc, grace_s=STOP_GRACE_S)


def _wait_ready(proc: subprocess.Popen[bytes], base: str, ready_path: str, what: str, log_path: Path, timeout_s: float) -> None:
    """Poll ``base + ready_path`` until 200; fail early when the process exits, or after ``timeout_s``."""
    w = wait_until(lambda: http_ok(base + ready_path, 2.0), timeout_s, interval_s=READY_POLL_S,
                   gone=lambda: None if proc.poll() is None else f"exited with status {proc.returncode}")
    if w.gone:
        raise EngineError(
            f"{what} for {base} {w.gone} before it was healthy; full log: {log_path}\n"
            f"--- server log (last lines) ---\n{log_tail(log_path)}"
        )
    if not w.ready:
        raise EngineError(
            f"{what} for {base} was not healthy within {timeout_s:.0f}s; raise LORALINE_ENGINE_TIMEOUT_S "
            f"if the machine is slow; full log: {log_path}\n--- server log (last lines) ---\n{log_tail(log_path)}"
        )


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"(log unreadable: {e})"
    return "\n".join(text.rstrip().splitlines()[-lines:])
