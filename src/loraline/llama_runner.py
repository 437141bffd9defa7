"""llama.cpp's side of :mod:`loraline.llama_engine`: quantize a GGUF file, or generate greedily from one, driven by JSON.

Run as a file by the llama.cpp environment's Python (``$LORALINE_LLAMA_PYTHON llama_runner.py``, the ``.venv-llama``
that ``make setup`` builds), never imported by loraline: it uses only the standard library, numpy and
llama-cpp-python's public API (``Llama``, ``llama_model_quantize``).

Reads one request (JSON) from stdin and writes one answer as the last line of stdout, prefixed ``LORALINE_RESULT ``
(llama.cpp logs to stderr)::

    {"mode": "info", "converter": PATH}
      -> {"llama_cpp_python": "0.3.36", "llama_cpp_commit": "0c1e57098" | null, "gguf": "0.19.0",
          "converter_sha256": ...}
    {"mode": "quantize", "input": GGUF, "output": GGUF, "ftype": 7, "threads": 2}
      -> {"seconds": ...}
    {"mode": "generate", "model": GGUF, "prompts": [[ids], ...], "max_tokens": 24, "logprobs": 5, "n_ctx": 2048,
     "threads": 2, "reuse_prefix": false}
      -> {"outputs": [{"token_ids": [...], "chosen_logprobs": [...], "logprobs": [{"<id>": lp, ...}, ...],
                       "text": ...}], "timings": {"load_s": ..., "generate_s": ..., "prompt_tokens": ...,
                                                  "prompt_tokens_reused": ...}}

Generation is greedy from the given token ids (no BOS added: the ids are the chat-rendered prompt as transformers
tokenized it), one prompt at a time; each step's log-softmax is computed from llama.cpp's raw logits in float64,
and generation stops after an end-of-generation token (it is kept, as transformers keeps its EOS) or ``max_tokens``.
``logprobs`` 0: no top-k per step (``logprobs`` entries are empty). ``reuse_prefix``: the KV cache of the tokens a prompt
shares with the one before is kept and only the rest is evaluated (what llama.cpp's server does; the task questions all
begin with the same system prompt and schema, most of each prompt).
On failure the line is ``LORALINE_RESULT {"error": ..., "traceback": ...}`` and the exit status 1.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import traceback
from pathlib import Path

RESULT_MARKER = "LORALINE_RESULT "


def _commit(converter: Path) -> str | None:
    """The llama.cpp commit the sdist vendors: its CHANGELOG's first "update llama.cpp to ggml-org/llama.cpp@SHA" under
    the installed version (the sdist has no .git)."""
    import llama_cpp

    changelog = converter.resolve().parents[2] / "CHANGELOG.md"  # <sdist>/vendor/llama.cpp/convert_hf_to_gguf.py
    if not changelog.is_file():
        return None
    text = changelog.read_text(encoding="utf-8")
    section = text.split(f"## [{llama_cpp.__version__}]", 1)[-1].split("\n## [", 1)[0]
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return m.group(1) if m else None


def info(req: dict) -> dict:
    from importlib.metadata import version

    import llama_cpp

    converter = Path(req["converter"])
    return {"llama_cpp_python": llama_cpp.__version__, "llama_cpp_commit": _commit(converter), "gguf": version("gguf"),
            "converter_sha256": hashlib.sha256(converter.read_bytes()).hexdigest()}


def quantize(req: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(req["ftype"])
    params.nthread = int(req.get("threads") or 0)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(req["input"]).encode(), str(req["output"]).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({req['input']} -> ftype {req['ftype']}) returned {rc}")
    return {"seconds": round(time.perf_counter() - t0, 3)}


def generate(req: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama, llama_cpp

    t0 = time.perf_counter()
    llm = Llama(model_path=str(req["model"]), n_ctx=int(req.get("n_ctx") or 2048), logits_all=True, verbose=False,
                n_threads=int(req.get("threads") or 1), n_batch=512, seed=0)
    load_s = time.perf_counter() - t0
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    top_k, max_tokens = int(req.get("logprobs", 5)), int(req["max_tokens"])
    reuse = bool(req.get("reuse_prefix"))
    outputs, previous, seen, reused = [], [], 0, 0
    t0 = time.perf_counter()
    for prompt in req["prompts"]:
        prompt = [int(t) for t in prompt]
        keep = 0
        if reuse:  # the longest prefix shared with the tokens now in the cache, less one: a token is always evaluated
            while keep < min(len(previous), len(prompt) - 1) and previous[keep] == prompt[keep]:
                keep += 1
        if keep:
            llm.n_tokens = keep  # eval() drops the cache from n_tokens on, then evaluates the rest
        else:
            llm.reset()
        llm.eval(prompt[keep:])
        seen, reused = seen + len(prompt), reused + keep
        tokens, chosen, tops = [], [], []
        for _ in range(max_tokens):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            lp = logits - logits.max()
            lp = lp - np.log(np.exp(lp).sum())
            tok = int(np.argmax(lp))
            best = np.argpartition(-lp, top_k)[:top_k] if top_k > 0 else ()
            tokens.append(tok)
            chosen.append(float(lp[tok]))
            tops.append({str(int(i)): float(lp[i]) for i in best})
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            llm.eval([tok])
        text = llm.detokenize([t for t in tokens if not llama_cpp.llama_vocab_is_eog(vocab, t)]).decode("utf-8", "replace")
        outputs.append({"token_ids": tokens, "chosen_logprobs": chosen, "logprobs": tops, "text": text})
        previous = [int(t) for t in llm.input_ids[: llm.n_tokens]]  # what the cache holds now
    return {"outputs": outputs, "timings": {"load_s": round(load_s, 3), "generate_s": round(time.perf_counter() - t0, 3),
                                            "prompt_tokens": seen, "prompt_tokens_reused": reused}}


def main() -> int:
    try:
        req = json.loads(sys.stdin.read())
        answer = {"info": info, "quantize": quantize, "generate": generate}[req.get("mode", "generate")](req)
    except Exception as e:  # noqa: BLE001 - reported to the caller as JSON
        print(RESULT_MARKER + json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))
        return 1
    print(RESULT_MARKER + json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
