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
    engine: str  # "transformers" | "vllm" | "vllm-server" | "llama.cpp-server"
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
    # OpenAI-server paths: the peak of the server process group's summed RSS (:class:`loraline.services.process.PeakRss`),
    # measured alike for vLLM and llama.cpp; ``engine_start_s`` there is spawn -> ready.
    peak_rss_bytes: int | None = None
    quant: str | None = None  # the weights served: "bf16" (vLLM, the merged safetensors' dtype), "q8_0" (a GGUF file)...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_prompts(vocab_size: int, n: int, input_len: int, *, seed: int, reserved: int = 3) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``input_len`` random token ids (ids < ``reserved`` are specials, skipped)."""
    rng = random.Random(seed)
    out = [[rng.randrange(reserved, vocab_size) for _ in range(input_len)] for _ in range(n)]
    assert len({tuple(p) for p in out}) == n  # unique: no prefix-cache hit between requests
    return out


@dataclass(frozen=True)
class TextPrompt:
    """A prompt both as token ids (vLLM takes these) and as a text that tokenizes to exactly those ids (llama-cpp-python's
    server takes only text)."""

    ids: tuple[int, ...]
    text: str


def word_tokens(tokenizer: Any) -> list[int]:
    """The ids whose text is one space and ASCII letters (``" word"``): a run of them splits into the same words again
    (a byte-level BPE pre-tokenizer cuts before each space), so its text tokenizes back to the same ids wherever the
    tokenizer gives a word's own id back for it (:func:`text_prompts` checks, and drops the few it does not). Sorted;
    empty for a tokenizer without such tokens (byte-level BPE spells the space ``Ġ``; ASCII letters are themselves)."""
    return sorted(i for tok, i in tokenizer.get_vocab().items()
                  if len(tok) >= 3 and tok[0] == "\u0120" and tok[1:].isascii() and tok[1:].isalpha())


def special_ids(tokenizer: Any) -> list[int]:
    """Every special token's id (``<|endoftext|>``, ``<|im_end|>``, ...): what llama.cpp may treat as the end of a
    generation, biased away when outputs must run to ``max_tokens``."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted({*(int(i) for i, t in added.items() if getattr(t, "special", False)),
                   *(getattr(tokenizer, "all_special_ids", ()) or ())})


def text_prompts(tokenizer: Any, n: int, input_len: int, *, seed: int, words: Sequence[int] | None = None) -> list[TextPrompt]:
    """``n`` distinct prompts of exactly ``input_len`` random whole-word token ids (:func:`word_tokens`), each with its
    text; every text is checked to tokenize back to its ids (a word that does not is dropped from the pool and the
    prompt drawn again). The same seed and pool give the same prompts, whoever asks."""
    pool = list(words) if words is not None else word_tokens(tokenizer)
    if len(pool) < 100:
        raise ValueError(f"the tokenizer has only {len(pool)} whole-word tokens; text prompts need a byte-level BPE "
                         "vocabulary with space-prefixed words")
    rng = random.Random(seed)
    out: list[TextPrompt] = []
    while len(out) < n:
        ids = tuple(rng.choice(pool) for _ in range(input_len))
        text = tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
        if list(tokenizer(text, add_special_tokens=False)["input_ids"]) == list(ids):
            out.append(TextPrompt(ids=ids, text=text))
            continue
        bad = {i for i in set(ids) if list(tokenizer(tokenizer.decode([i]), add_special_tokens=False)["input_ids"]) != [i]}
        if not bad:
            raise ValueError(f"the text of a prompt of {input_len} whole-word tokens does not tokenize back to its ids")
        pool = [i for i in pool if i not in bad]
    assert len({p.ids for p in out}) == n  # unique: no prefix-cache hit between requests
    return out
