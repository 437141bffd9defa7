"""Load on vLLM's OpenAI-compatible server: streaming completions at a fixed concurrency.

The client side of the server path of the benchmark (:mod:`loraline.workload` holds the protocol).
Each request is a ``/v1/completions`` call with the prompt as token ids, greedy, ``max_tokens =
output_len`` with vLLM's ``ignore_eos`` (the caller checks every request got exactly that many), streamed with ``return_token_ids``
so every chunk says how many tokens it carries. Per request it records:

- TTFT: request sent -> first chunk that carries a token;
- ITL: the gaps between successive token-carrying chunks (one gap per chunk, as vLLM's own
  ``vllm bench serve`` counts them);
- TPOT: (e2e - TTFT) / (tokens - 1);
- e2e: request sent -> the stream's ``[DONE]``;
- the tokens received (summed from the chunks, checked against the final ``usage``).

The client is aiohttp, as in vLLM's own harness (its per-chunk cost is what this measures
alongside the server on a small host). A level (:func:`run_level`) keeps at most ``concurrency`` requests in flight; its throughput is
the output tokens of every request over the wall time from the first send to the last ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

from loraline.errors import EngineError


@dataclass(frozen=True)
class RequestRecord:
    """One streamed request, as the client saw it (seconds)."""

    ok: bool
    output_tokens: int
    ttft_s: float
    e2e_s: float
    itl_s: tuple[float, ...]
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(frozen=True)
class LevelResult:
    """One timed measurement at one concurrency: every request's record and the wall time."""

    concurrency: int
    elapsed_s: float
    records: tuple[RequestRecord, ...]

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.records if r.ok)

    @property
    def failed(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.ok]


def completion_body(model: str, prompt: Sequence[int], output_len: int, token_ids: bool = True) -> dict[str, Any]:
    """The request: token-id prompt, greedy, exactly ``output_len`` tokens, streamed (with token ids if asked)."""
    body = {
        "model": model,
        "prompt": [int(t) for t in prompt],
        "max_tokens": output_len,
        "ignore_eos": True,  # vLLM extension
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,  # vLLM extension: each chunk lists the token ids it carries
    }
    if not token_ids:
        del body["return_token_ids"]
    return body


async def stream_one(session: Any, url: str, model: str, prompt: Sequence[int], output_len: int,
                     token_ids: bool = True) -> RequestRecord:
    """Send one streaming completion and time it; never raises (a failure is a record with ``ok=False``).

    ``token_ids=False``: do not ask for ``return_token_ids``; every chunk with a choice counts as
    a token arrival and the token count comes from the final ``usage`` (as ``vllm bench serve``).
    """
    t0 = time.perf_counter()
    first: float | None = None
    last: float | None = None
    itl: list[float] = []
    tokens = 0
    usage_tokens: int | None = None
    try:
        body = completion_body(model, prompt, output_len, token_ids)
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                body = (await resp.read()).decode(errors="replace")[:500]
                return RequestRecord(False, 0, 0.0, time.perf_counter() - t0, (), f"HTTP {resp.status}: {body}")
            async for raw in resp.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                choices = chunk.get("choices") or []
                n = sum(len(c.get("token_ids") or []) for c in choices) if token_ids else len(choices)
                if n:
                    if first is None:
                        first = now
                    else:
                        itl.append(now - (last or now))
                    last = now
                    tokens += n
    except Exception as e:  # noqa: BLE001 - connection errors, timeouts: recorded, reported by the caller
        return RequestRecord(False, tokens, 0.0, time.perf_counter() - t0, tuple(itl), f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - t0
    if first is None:
        return RequestRecord(False, 0, 0.0, e2e, (), "the stream carried no tokens")
    if not token_ids:
        if usage_tokens is None:
            return RequestRecord(False, 0, first - t0, e2e, tuple(itl), "no usage in the stream to count tokens from")
        tokens = usage_tokens
    elif usage_tokens is not None and usage_tokens != tokens:
        return RequestRecord(False, tokens, first - t0, e2e, tuple(itl),
                             f"chunks carried {tokens} tokens but usage says {usage_tokens}")
    return RequestRecord(True, tokens, first - t0, e2e, tuple(itl))


async def _level(url: str, model: str, prompts: Sequence[Sequence[int]], output_len: int, concurrency: int,
                 timeout_s: float, token_ids: bool) -> LevelResult:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=1 << 20) as session:
        async def one(p: Sequence[int]) -> RequestRecord:
            async with sem:
                return await stream_one(session, url, model, p, output_len, token_ids)

        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - t0
    return LevelResult(concurrency=concurrency, elapsed_s=elapsed, records=tuple(records))


def run_level(url: str, model: str, prompts: Sequence[Sequence[int]], output_len: int, concurrency: int, *,
              timeout_s: float = 600.0, token_ids: bool = True) -> LevelResult:
    """Send every prompt (at most ``concurrency`` in flight) and wait for all of them."""
    if concurrency < 1:
        raise EngineError(f"concurrency must be >= 1, not {concurrency}: set LORALINE_BENCH_CONCURRENCY to levels >= 1")
    return asyncio.run(_level(url, model, prompts, output_len, concurrency, timeout_s, token_ids))
