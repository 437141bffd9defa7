"""llama.cpp beside vLLM-CPU: llama-cpp-python's OpenAI server on each GGUF file of a release, under the same load.

For each file (``f16``, ``q8_0``, ``q4_k_m``...) :func:`bench_llama_servers` starts ``python -m llama_cpp.server`` in the
llama.cpp environment (:func:`loraline.server.serve_llama`), checks once that a request gives exactly ``output_len``
tokens (the server's own ``usage``, non-streamed) and reads the prompt as exactly ``input_len`` tokens, then runs the
server levels of :func:`loraline.benchmark.load_server` with the prompts vLLM's merged server gets
(:func:`loraline.workload.text_prompts`: the same token ids, sent as their text): one ``PathResult`` per level, path
``llama.cpp-server-<quant>``, with the server's start-to-ready seconds and its process group's peak RSS, measured as
vLLM's server's are.

llama-cpp-python serves one request at a time (one ``Llama`` behind a lock, no parallel slots): at concurrency N the
requests queue, so TTFT grows with N while throughput stays that of one stream. Levels above
:data:`MAX_CONCURRENCY` are not run (they only lengthen the queue).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from loraline.errors import EngineError
from loraline.gguf_export import exported_file
from loraline.settings import Settings
from loraline.workload import PathResult, TextPrompt, Workload

MAX_CONCURRENCY = 32
PATH = "llama.cpp-server-{quant}"
NOTE = ("llama-cpp-python's server serves one request at a time: at concurrency N the others queue (TTFT includes the "
        "wait); streaming /v1/completions with the text of the same token ids as vLLM's prompts; end-of-generation "
        "tokens biased -100, finish_reason 'length' at max_tokens; engine_start_s = spawn to /v1/models 200")


@dataclass(frozen=True)
class GgufTarget:
    """A GGUF file of the release to serve: its type, where it is, its parity verdict against the merged model."""

    quant: str
    path: Path
    verdict: str  # identical | close | failed (gguf_export.GgufFile.verdict)
    bytes: int = 0


def gguf_targets(entries: Sequence[dict[str, Any]], gguf_dir: Path, merged_sha256: str) -> tuple[list[GgufTarget], list[str]]:
    """The release's GGUF files (its lineage ``gguf`` entries) that are on this machine
    (``<gguf_dir>/<merged sha256>/<file>``, checked by size), and a note for each one that is not."""
    found, notes = [], []
    for e in entries:
        path, there = exported_file(e, gguf_dir, merged_sha256)
        if not there:
            notes.append(f"llama.cpp {e['quant']}: the GGUF file is not at {path} (run the release's gguf step again to "
                         f"make it, or fetch {e.get('uri')}); not benchmarked")
            continue
        found.append(GgufTarget(quant=str(e["quant"]), path=path, verdict=str((e.get("parity") or {}).get("verdict")),
                                bytes=path.stat().st_size))
    return found, notes


def bench_llama_servers(targets: Sequence[GgufTarget], settings: Settings, workload: Workload, *,
                        prompts: Callable[[int, int], list[TextPrompt]], no_eos_ids: Sequence[int], seed: int,
                        threads: int | None = None, n_ctx: int = 2048, served_name: str = "model",
                        progress: Callable[[str], None] = lambda _m: None) -> tuple[list[PathResult], dict[str, Any]]:
    """Benchmark each GGUF file on llama-cpp-python's server, one server at a time: the results (one per level) and
    per path what the engine reported (ready seconds, memory, threads, the usage check, the log)."""
    from loraline.benchmark import load_server, server_results
    from loraline.llama_engine import find_llama, free_cores
    from loraline.loadgen import check_usage
    from loraline.server import serve_llama

    levels = [c for c in workload.concurrency if c <= MAX_CONCURRENCY]
    if not levels:
        raise EngineError(f"no concurrency level of {list(workload.concurrency)} is <= {MAX_CONCURRENCY}: llama.cpp's server "
                          "takes one request at a time; add a level such as 1 or 8 to LORALINE_BENCH_CONCURRENCY")
    if workload.input_len + workload.output_len > n_ctx:
        raise EngineError(f"{workload.input_len} prompt + {workload.output_len} output tokens do not fit llama.cpp's context "
                          f"of {n_ctx}; shorten LORALINE_BENCH_INPUT_LEN/OUTPUT_LEN")
    llama = find_llama(settings)
    results: list[PathResult] = []
    engines: dict[str, Any] = {}
    for t in targets:
        path = PATH.format(quant=t.quant)
        # ggml's threads wait for each other at every op: on a busy machine fewer run faster (llama_engine.free_cores)
        n_threads = threads or free_cores()
        progress(f"{path}: server start ({t.path.name}, {t.bytes / 1e6:.0f} MB, {n_threads} threads), concurrency {levels}")
        with serve_llama(t.path, settings, served_model_name=served_name, n_ctx=n_ctx, threads=n_threads) as server:
            probe = prompts(1, seed - 1)[0]
            usage = check_usage(server.url, served_name, probe.text, workload.output_len, no_eos_ids, settings.engine_timeout_s)
            if usage["completion_tokens"] != workload.output_len or usage["finish_reason"] != "length":
                raise EngineError(f"the llama.cpp server on {t.path} gave {usage['completion_tokens']} tokens "
                                  f"(finish_reason {usage['finish_reason']!r}), not {workload.output_len}, with the "
                                  "end-of-generation tokens biased away; its log: " + str(server.log_path))
            if usage["prompt_tokens"] != len(probe.ids):
                raise EngineError(f"the llama.cpp server on {t.path} read a {len(probe.ids)}-token prompt as "
                                  f"{usage['prompt_tokens']} tokens: its tokenizer differs from the model's; its log: "
                                  f"{server.log_path}")
            lv = load_server(server.url, served_name, workload, 0, seed, settings.engine_timeout_s, progress,
                             prompts=lambda n, s: [p.text for p in prompts(n, s)], api="llama.cpp", no_eos_ids=no_eos_ids,
                             levels_to_run=levels)
        memory = server.memory_report()
        engines[path] = {"engine_start_s": server.ready_s, "memory": memory, "threads": n_threads, "n_ctx": n_ctx,
                         "gguf": str(t.path), "bytes": t.bytes, "parity": t.verdict, "usage_check": usage,
                         "llama_cpp_python": llama.llama_cpp_python, "llama_cpp_commit": llama.llama_cpp_commit,
                         "log": str(server.log_path)}
        rss = memory.get("peak_rss_bytes") or None  # llama.cpp reports no memory of its own: its RSS is the figure
        results += server_results(lv, path, "merged", workload, start_s=server.ready_s, memory=rss,
                                  engine="llama.cpp-server", rss=rss, quant=t.quant,
                                  notes=(NOTE,))
    return results, engines


def model_dtype(model_dir: Path) -> str:
    """The merged model's declared dtype (``config.json``), short: what vLLM serves it in (``dtype="auto"``)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "auto")
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dtype, dtype)
