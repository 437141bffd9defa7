"""Parity: does the merged model generate what base + adapter (unmerged) generates?

Bit-identical tokens are not guaranteed (the merged weight W + BA is rounded to the base's
dtype), so prompts are judged the way vLLM's own tests do (``check_logprobs_close``): a prompt
passes if the greedy tokens are identical, or if at the first divergence each side's token is
in the other's top-k logprobs there (both sides were conditioned on the same prefix). The same
rule judges vLLM's outputs against HF's in later steps: :func:`judge` is engine-agnostic.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Sequence

from loraline.hf_models import greedy
from loraline.settings import Settings

Verdict = Literal["identical", "close", "failed"]


@dataclass(frozen=True)
class Generation:
    """One greedy generation: token ids, each token's logprob, and the top-k logprobs at each step."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    top: tuple[dict[int, float], ...]
    text: str = ""


@dataclass(frozen=True)
class PromptParity:
    prompt: str
    verdict: Verdict
    first_divergence: int | None  # index into the generated tokens, None when identical
    max_abs_logprob_diff: float  # over the shared prefix (chosen-token logprobs)
    a_text: str
    b_text: str


@dataclass(frozen=True)
class ParityReport:
    a: str  # what was compared, e.g. "peft-unmerged"
    b: str  # e.g. "merged"
    prompts: int
    identical: int
    close: int
    failed: int
    max_abs_logprob_diff: float
    top_k: int
    max_new_tokens: int
    seconds: float
    results: tuple[PromptParity, ...] = field(default=())
    max_model_len: int | None = None  # the context the vLLM engine ran with (vLLM sides only)

    @property
    def passed(self) -> bool:
        return self.failed == 0

    def summary(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if k != "results"}

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def judge(a: Generation, b: Generation, top_k: int) -> tuple[Verdict, int | None, float]:
    """Compare two greedy generations of the same prompt: (verdict, first divergence, max |Δlogprob|)."""
    n = min(len(a.tokens), len(b.tokens))
    first = next((i for i in range(n) if a.tokens[i] != b.tokens[i]), None)
    if first is None and len(a.tokens) != len(b.tokens):
        first = n  # one stopped early: diverges where the shorter ended
    shared = n if first is None else first
    diff = max((abs(a.logprobs[i] - b.logprobs[i]) for i in range(shared)), default=0.0)
    if first is None:
        return "identical", None, diff
    if first >= len(a.tokens) or first >= len(b.tokens):
        return "failed", first, diff
    a_tok, b_tok = a.tokens[first], b.tokens[first]
    a_top = set(sorted(a.top[first], key=a.top[first].__getitem__, reverse=True)[:top_k])
    b_top = set(sorted(b.top[first], key=b.top[first].__getitem__, reverse=True)[:top_k])
    ok = b_tok in a_top and a_tok in b_top
    return ("close" if ok else "failed"), first, diff


def report(a_name: str, b_name: str, prompts: Sequence[str], a: Sequence[Generation], b: Sequence[Generation], *,
           top_k: int, max_new_tokens: int, seconds: float) -> ParityReport:
    """Judge each prompt and count the verdicts."""
    results = []
    for prompt, ga, gb in zip(prompts, a, b, strict=True):
        verdict, first, diff = judge(ga, gb, top_k)
        results.append(PromptParity(prompt, verdict, first, diff, ga.text, gb.text))
    return ParityReport(
        a=a_name,
        b=b_name,
        prompts=len(results),
        identical=sum(r.verdict == "identical" for r in results),
        close=sum(r.verdict == "close" for r in results),
        failed=sum(r.verdict == "failed" for r in results),
        max_abs_logprob_diff=max((r.max_abs_logprob_diff for r in results), default=0.0),
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        seconds=seconds,
        results=tuple(results),
    )


def encode_prompts(tokenizer: object, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts, without added special tokens (the chat template already has them)."""
    return [list(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]  # type: ignore[operator]


def generate_greedy_ids(
    model: object, tokenizer: object, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, top_k: int
) -> list[Generation]:
    """Greedy generation with transformers from token ids, one prompt at a time (no padding effects)."""
    import torch

    outs: list[Generation] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # type: ignore[attr-defined]
    for prompt in prompt_ids:
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        out = greedy(model, ids, max_new_tokens=max_new_tokens, pad_token_id=pad, output_logits=True,
                     return_dict_in_generate=True)
        gen = out.sequences[0, ids.shape[1]:].tolist()
        tokens, lps, tops = [], [], []
        for tok, logits in zip(gen, out.logits):
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            vals, idx = lp.topk(top_k)
            tokens.append(int(tok))
            lps.append(float(lp[tok]))
            tops.append({int(i): float(v) for i, v in zip(idx, vals)})
        text = tokenizer.decode(gen, skip_special_tokens=True)  # type: ignore[attr-defined]
        outs.append(Generation(tuple(tokens), tuple(lps), tuple(tops), text))
    return outs


def parity_key(adapter_sha256: str, base_sha256: str, merged_sha256: str, settings: Settings) -> str:
    """Everything a parity verdict depends on (the flow's cache key): the three digests and the settings it reads."""
    return (f"parity-{merged_sha256}-{adapter_sha256}-{base_sha256}-{settings.parity_prompts}-"
            f"{settings.parity_max_new_tokens}-{settings.parity_top_k}")


def check_parity(adapter_dir: Path, base_dir: Path, merged_dir: Path, prompts: Sequence[str], settings: Settings) -> ParityReport:
    """Greedy outputs of base + adapter (peft, unmerged) vs the merged model reloaded from disk."""
    from loraline.hf_models import load_tokenizer

    t0 = time.perf_counter()
    kw = dict(max_new_tokens=settings.parity_max_new_tokens, top_k=settings.parity_top_k)
    ids = encode_prompts(load_tokenizer(merged_dir, merged_dir, settings), prompts)
    # One model in memory at a time: the runtime side first, then the merged one from disk.
    a = hf_peft_generations(adapter_dir, base_dir, merged_dir, ids, settings)
    b = hf_generations(merged_dir, ids, settings)
    return report("peft-unmerged", "merged", prompts, a, b, seconds=time.perf_counter() - t0, **kw)


# Greedy generations are a function of the weights, the prompt ids and the settings. A release asks for the same ones
# several times: peft's in HF parity and again as vLLM parity's reference, the merged model's in HF parity and again as
# the smoke test's reference (about 13 s each for the real demo model on 2 cores). This process computes each once.
_GENERATIONS: dict[tuple, list[Generation]] = {}
_GENERATIONS_KEPT = 8


def _weights_stamp(d: Path) -> tuple:
    """A directory and its weight files' sizes and mtimes: changed weights (rewritten, damaged) are not the same key."""
    return (str(d), tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(d).glob("*.safetensors"))))


def _remembered(key: tuple, compute: Callable[[], list[Generation]]) -> list[Generation]:
    if key not in _GENERATIONS:
        while len(_GENERATIONS) >= _GENERATIONS_KEPT:
            _GENERATIONS.pop(next(iter(_GENERATIONS)))
        _GENERATIONS[key] = compute()
    return list(_GENERATIONS[key])


def _generate_loaded(load: Callable[[], object], tokenizer_dir: Path, prompt_ids: Sequence[Sequence[int]],
                     settings: Settings) -> list[Generation]:
    """Load a model with ``load``, generate greedily, free it (one model in memory at a time)."""
    import gc

    from loraline.hf_models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, tokenizer_dir, settings)
    model = load()
    try:
        return generate_greedy_ids(model, tok, prompt_ids, max_new_tokens=settings.parity_max_new_tokens,
                                   top_k=settings.parity_top_k)
    finally:
        del model
        gc.collect()


def hf_generations(model_dir: Path, prompt_ids: Sequence[Sequence[int]], settings: Settings) -> list[Generation]:
    """Greedy generations of the model in ``model_dir`` (its own tokenizer and dtype) with transformers."""
    from loraline.hf_models import base_dtype_name, compute_dtype_name, load_causal_lm

    dtype = compute_dtype_name(base_dtype_name(model_dir))
    key = ("hf", _weights_stamp(model_dir), dtype, tuple(map(tuple, prompt_ids)), settings.parity_max_new_tokens,
           settings.parity_top_k, settings.trust_remote_code)
    return _remembered(key, lambda: _generate_loaded(lambda: load_causal_lm(model_dir, settings, dtype), model_dir,
                                                     prompt_ids, settings))


def hf_peft_generations(adapter_dir: Path, base_dir: Path, tokenizer_dir: Path, prompt_ids: Sequence[Sequence[int]],
                        settings: Settings) -> list[Generation]:
    """The reference: base + adapter unmerged (peft), greedy, in the dtype the merged model is computed in."""
    from loraline.hf_models import base_dtype_name, compute_dtype_name, load_peft

    dtype = compute_dtype_name(base_dtype_name(tokenizer_dir))
    key = ("peft", _weights_stamp(adapter_dir), _weights_stamp(base_dir), str(tokenizer_dir), dtype,
           tuple(map(tuple, prompt_ids)), settings.parity_max_new_tokens, settings.parity_top_k, settings.trust_remote_code)
    return _remembered(key, lambda: _generate_loaded(lambda: load_peft(base_dir, adapter_dir, settings, dtype),
                                                     tokenizer_dir, prompt_ids, settings))


def _parsed(response: dict) -> tuple[list[Generation], int | None]:
    """A runner response as generations, and the ``max_model_len`` the engine ran with (None if it did not say)."""
    generations = [
        Generation(
            tokens=tuple(out["token_ids"]),
            logprobs=tuple(out["chosen_logprobs"]),
            top=tuple({int(t): lp for t, lp in step.items()} for step in out["logprobs"]),
            text=out["text"],
        )
        for out in response["outputs"]
    ]
    context = (response.get("config") or {}).get("max_model_len")
    return generations, int(context) if isinstance(context, int) else None


def vllm_generations(model_dir: Path, prompt_ids: Sequence[Sequence[int]], settings: Settings, *,
                     lora: tuple[str, Path, int] | None = None) -> tuple[list[Generation], int | None]:
    """Greedy generations by vLLM's offline engine (out of process), with runtime LoRA when ``lora`` is given, and
    the ``max_model_len`` the engine ran with (None if it did not say)."""
    return vllm_generations_of([(model_dir, lora)], prompt_ids, settings)[0][0]


def vllm_generations_of(models: Sequence[tuple[Path, tuple[str, Path, int] | None]], prompt_ids: Sequence[Sequence[int]],
                        settings: Settings) -> list[tuple[tuple[list[Generation], int | None], float]]:
    """:func:`vllm_generations` for several ``(model_dir, lora)`` in one engine process (one engine after the other:
    vLLM imported once), each with the seconds its engine took (start + generate; the first also carries the process's
    start: the times add up to the call's)."""
    from loraline.engine import Generate, run_generations

    t0 = time.perf_counter()
    runs = [Generate(model_dir, [list(p) for p in prompt_ids], settings.parity_max_new_tokens, lora,
                     logprobs=settings.parity_top_k) for model_dir, lora in models]
    responses = run_generations(runs, settings)
    total = time.perf_counter() - t0
    own = [float(r["timings"].get("engine_start_s", 0)) + float(r["timings"].get("generate_s", 0)) for r in responses]
    seconds = [total - sum(own[1:])] + own[1:]
    return [(_parsed(r), s) for r, s in zip(responses, seconds)]


def check_vllm_parity(adapter_dir: Path, base_dir: Path, merged_dir: Path, prompts: Sequence[str],
                      settings: Settings, *, runtime_lora: bool = True) -> tuple[ParityReport, ...]:
    """Does vLLM generate what HF peft (base + adapter, unmerged) generates? Merged, and base + runtime LoRA.

    Every side gets the same token ids (the prompts tokenized once with the merged model's
    tokenizer), so tokenizer differences between the environments cannot hide or fake a
    divergence. Returns ``(hf-peft vs vllm-merged, hf-peft vs vllm-lora)`` (the second only with ``runtime_lora``), judged by :func:`judge`;
    pass each to :func:`require_parity`. Both vLLM engines run in one engine process, one after the other (one import
    of vLLM and torch; tens of seconds on CPU); each report's ``seconds`` is the HF reference's plus its engine's.
    """
    from loraline.engine import vllm_lora_rank
    from loraline.hf_models import load_tokenizer

    kw = dict(max_new_tokens=settings.parity_max_new_tokens, top_k=settings.parity_top_k)
    ids = encode_prompts(load_tokenizer(merged_dir, merged_dir, settings), prompts)
    t0 = time.perf_counter()
    reference = hf_peft_generations(adapter_dir, base_dir, merged_dir, ids, settings)
    hf_s = time.perf_counter() - t0

    models: list[tuple[Path, tuple[str, Path, int] | None]] = [(merged_dir, None)]
    if runtime_lora:  # else DoRA, modules_to_save, ...: vLLM cannot serve it as base + LoRA (validation said why)
        models.append((base_dir, ("adapter", adapter_dir, vllm_lora_rank(adapter_dir))))
    reports = []
    for name, ((generations, context), seconds) in zip(("vllm-merged", "vllm-lora"), vllm_generations_of(models, ids, settings)):
        rep = report("hf-peft", name, prompts, reference, generations, seconds=hf_s + seconds, **kw)
        reports.append(replace(rep, max_model_len=context))
    return tuple(reports)


def require_parity(report: ParityReport) -> ParityReport:
    """Fail the release when any prompt failed the logprobs-close rule."""
    from loraline.errors import ParityError

    if report.passed:
        return report
    bad = next(r for r in report.results if r.verdict == "failed")
    if report.b.startswith("vllm"):
        hint = (
            f"{report.b} does not reproduce the adapter as HF peft runs it — check that vLLM supports every module the "
            "adapter targets (it skips unsupported ones), and that the engine runs the model's dtype"
        )
    elif report.b.startswith("llama.cpp"):
        hint = (
            f"llama.cpp on the {report.b.removeprefix('llama.cpp-')} GGUF file does not reproduce the merged model — check "
            "that llama.cpp's converter supports the architecture as transformers runs it (tokenizer, RoPE, tied "
            "embeddings), or pass --gguf none"
        )
    else:
        hint = (
            "the merged model does not reproduce the adapter — check the base matches the one the adapter was trained "
            "on, or merge in float32 (LORALINE_MERGE_DTYPE=float32)"
        )
    raise ParityError(
        f"parity {report.a} vs {report.b} failed on {report.failed} of {report.prompts} prompts (first: diverged at token "
        f"{bad.first_divergence}, {bad.a_text[:40]!r} vs {bad.b_text[:40]!r}); {hint}"
    )


def parity_prompts(tokenizer_dir: Path, settings: Settings) -> list[str]:
    """The fixed parity prompt set: the first eval questions, rendered with the model's chat template."""
    from loraline.hf_models import load_tokenizer
    from loraline.text2sql import load_examples, render_prompt

    tok = load_tokenizer(tokenizer_dir, tokenizer_dir, settings)
    questions = [e.question for e in load_examples("eval")[: settings.parity_prompts]]
    return [render_prompt(tok, q) for q in questions]
