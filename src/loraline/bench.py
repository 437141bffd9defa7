"""Benchmark protocol and the Transformers side of it (HF ``generate`` on merged and peft-unmerged).

Protocol (the same for every path, so numbers compare):
- fixed-length prompts of random token ids (``input_len`` in, exactly ``output_len`` out with
  ``ignore_eos`` / ``min_new_tokens``), drawn fresh for every measurement so no path gets prefix-
  cache hits from warm-up or earlier repeats;
- ``warmup`` untimed batches first; then ``repeats`` timed measurements, reported with their spread;
- per request: TTFT (first token), TPOT ((e2e - TTFT) / (out - 1)), ITL (gaps between tokens),
  end-to-end latency; per measurement: output tokens/s and requests/s; peak memory.

The vLLM side runs in the engine process (:mod:`loraline.engine`) with the same workload.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from loraline.errors import EngineError
from loraline.settings import Settings


@dataclass(frozen=True)
class Workload:
    """What is measured: prompt/output lengths, request count, batches, repeats."""

    prompts: int = 32
    input_len: int = 128
    output_len: int = 128
    batch_size: int = 32  # HF generate batches; vLLM schedules all prompts at once
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    concurrency: tuple[int, ...] = (1, 8, 32, 128)  # OpenAI-server levels
    server_min_requests: int = 16  # per server level and repeat: max(this, 2 x concurrency)
    single_stream_pairs: int = 4  # vLLM offline: (TTFT request, full request) pairs on one stream

    def server_requests(self, concurrency: int) -> int:
        """Requests per timed repeat at one concurrency: enough that the level is held, not just reached."""
        return max(self.server_min_requests, 2 * concurrency)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Workload":
        return cls(
            prompts=settings.bench_prompts,
            input_len=settings.bench_input_len,
            output_len=settings.bench_output_len,
            batch_size=min(settings.bench_prompts, 32),
            repeats=settings.bench_repeats,
            concurrency=tuple(settings.bench_concurrency),
            server_min_requests=settings.bench_server_min_requests,
        )


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Percentiles":
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0)
        v = sorted(values)
        return cls(_pct(v, 50), _pct(v, 90), _pct(v, 99), statistics.fmean(v))


def _pct(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), on already sorted values."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


@dataclass(frozen=True)
class PathResult:
    """One benchmarked path, e.g. ``hf-merged`` or ``vllm-offline-lora``."""

    path: str
    engine: str  # "transformers" | "vllm" | "vllm-server"
    mode: str  # "merged" | "lora"
    requests: int  # per measurement
    output_tokens: int  # per measurement (all requests)
    output_tok_s: float  # median over repeats
    output_tok_s_repeats: tuple[float, ...]
    requests_s: float
    ttft_ms: Percentiles | None  # None: not measured on this path
    tpot_ms: Percentiles | None
    itl_ms: Percentiles | None
    e2e_ms: Percentiles | None
    peak_memory_bytes: int | None  # HF: torch's peak (CUDA) or peak RSS (CPU); vLLM: its own report
    engine_start_s: float | None = None
    concurrency: int | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_prompts(vocab_size: int, n: int, input_len: int, *, seed: int, reserved: int = 3) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``input_len`` random token ids (ids < ``reserved`` are specials, skipped)."""
    rng = random.Random(seed)
    out = [[rng.randrange(reserved, vocab_size) for _ in range(input_len)] for _ in range(n)]
    assert len({tuple(p) for p in out}) == n  # unique: no prefix-cache hit between requests
    return out


def _peak_memory_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def hf_generate_batch(model: Any, prompts: Sequence[Sequence[int]], output_len: int, pad_id: int) -> tuple[float, list[float]]:
    """Generate exactly ``output_len`` tokens for one batch; return (start time, per-step timestamps)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):  # called once per decoding step, after the token is chosen
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    ids = torch.tensor([list(p) for p in prompts], device=device)  # equal lengths: no padding needed
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([Stamp()]),
        )
    if out.shape[1] - ids.shape[1] != output_len:
        raise EngineError(f"HF generate stopped after {out.shape[1] - ids.shape[1]} of {output_len} tokens: the timed "
                          "run must produce every token (min_new_tokens); report this model's generation config")
    return t0, stamps


def bench_hf(model: Any, path: str, mode: str, vocab_size: int, workload: Workload, pad_id: int = 0) -> PathResult:
    """Benchmark HF ``generate`` (batches of ``workload.batch_size``) on an already loaded model."""
    seed = workload.seed
    for _ in range(workload.warmup):
        hf_generate_batch(model, random_prompts(vocab_size, min(workload.batch_size, workload.prompts), workload.input_len,
                                                seed=seed + 10_000), workload.output_len, pad_id)
    _peak_memory_reset()
    tput, ttft, tpot, itl, e2e, req_s = [], [], [], [], [], []
    for r in range(workload.repeats):
        prompts = random_prompts(vocab_size, workload.prompts, workload.input_len, seed=seed + r + 1)
        start = time.perf_counter()
        for i in range(0, len(prompts), workload.batch_size):
            t0, stamps = hf_generate_batch(model, prompts[i:i + workload.batch_size], workload.output_len, pad_id)
            n = len(prompts[i:i + workload.batch_size])
            # Every request in a batch gets its tokens at the same steps.
            ttft += [(stamps[0] - t0) * 1e3] * n
            e2e += [(stamps[-1] - t0) * 1e3] * n
            if len(stamps) > 1:
                tpot += [(stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3] * n
                itl += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
        total = time.perf_counter() - start
        tput.append(len(prompts) * workload.output_len / total)
        req_s.append(len(prompts) / total)
    return PathResult(
        path=path,
        engine="transformers",
        mode=mode,
        requests=workload.prompts,
        output_tokens=workload.prompts * workload.output_len,
        output_tok_s=statistics.median(tput),
        output_tok_s_repeats=tuple(tput),
        requests_s=statistics.median(req_s),
        ttft_ms=Percentiles.of(ttft),
        tpot_ms=Percentiles.of(tpot),
        itl_ms=Percentiles.of(itl),
        e2e_ms=Percentiles.of(e2e),
        peak_memory_bytes=_peak_memory(),
    )


def bench_hf_paths(adapter_dir: Path, base_dir: Path, merged_dir: Path, settings: Settings, workload: Workload) -> list[PathResult]:
    """HF ``generate`` on the merged model and on base + adapter (peft, unmerged)."""
    import gc

    import torch

    from loraline.hf_models import base_dtype_name, load_causal_lm, load_peft

    dtype = base_dtype_name(merged_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for path, mode, load in (
        ("hf-merged", "merged", lambda: load_causal_lm(merged_dir, settings, dtype)),
        ("hf-peft", "lora", lambda: load_peft(base_dir, adapter_dir, settings, dtype)),
    ):
        model = load().to(device)
        vocab = model.get_input_embeddings().weight.shape[0]
        results.append(bench_hf(model, path, mode, vocab, workload))
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results
