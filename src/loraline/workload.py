"""The benchmark protocol: the workload, its prompts, the percentiles and the per-path result every measurement fills.

Protocol (the same for every path, so numbers compare):
- fixed-length prompts of random token ids (``input_len`` in, exactly ``output_len`` out with
  ``ignore_eos`` / ``min_new_tokens``), drawn fresh for every measurement so no path gets prefix-
  cache hits from warm-up or earlier repeats;
- ``warmup`` untimed batches first; then ``repeats`` timed measurements, reported with their spread;
- per request: TTFT (first token), TPOT ((e2e - TTFT) / (out - 1)), ITL (gaps between tokens),
  end-to-end latency; per measurement: output tokens/s and requests/s; peak memory.

The Transformers side is :mod:`loraline.hf_bench` (in the orchestrator's process), the vLLM side runs in the engine
process (:mod:`loraline.engine`), both with the same workload; :mod:`loraline.benchmark` runs them all for a release.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

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
