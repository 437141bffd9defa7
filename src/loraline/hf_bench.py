"""The Transformers side of the benchmark protocol (:mod:`loraline.workload`): HF ``generate`` on the merged model and
on base + adapter (peft, unmerged), timed per decoding step, with peak memory (torch's peak on CUDA, RSS on CPU).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from loraline.errors import EngineError
from loraline.hf_models import greedy
from loraline.settings import Settings
from loraline.workload import PathResult, Percentiles, Workload, random_prompts


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
    out = greedy(model, ids, max_new_tokens=output_len, pad_token_id=pad_id, min_new_tokens=output_len,
                 stopping_criteria=StoppingCriteriaList([Stamp()]))
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

    from loraline.hf_models import base_dtype_name, compute_dtype_name, load_causal_lm, load_peft

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = compute_dtype_name(base_dtype_name(merged_dir), device)
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
