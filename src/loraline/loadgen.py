"""Load on an OpenAI-compatible server (vLLM's, or llama-cpp-python's): streaming completions at a fixed concurrency.

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

llama-cpp-python's server (``api="llama.cpp"``) takes neither token-id prompts nor ``ignore_eos`` nor
``return_token_ids``, and streams no ``usage``. There each prompt is its text (one that tokenizes back to exactly the
ids vLLM gets: :func:`loraline.workload.text_prompts`), the end-of-generation tokens get ``logit_bias`` -100 (the
OpenAI API's floor; greedy never picks them) and ``max_tokens = output_len``: the server appends a token to the output
only when it is not an end-of-generation one and stops at ``max_tokens`` with ``finish_reason="length"``, so a stream
that ends with ``length`` carried exactly ``output_len`` tokens (any other ending is a failed request). Its chunks
carry one token each, except where a character spans tokens (then one chunk carries them all): each chunk is a token
arrival for TTFT and ITL, as vLLM's chunks are. :func:`check_usage` (one non-streamed request, whose ``usage`` it does
report) confirms the token counts once per server.

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


APIS = ("vllm", "llama.cpp")
NO_TOKEN = -100.0  # the OpenAI API's lowest logit_bias (llama-cpp-python adds it to the logit: JSON has no -inf)


def llama_body(model: str, prompt: str, output_len: int, no_eos_ids: Sequence[int], stream: bool = True) -> dict[str, Any]:
    """The request to llama-cpp-python's server: text prompt, greedy, ``max_tokens`` with the end-of-generation tokens
    biased away (it has no ``ignore_eos``), streamed; ``repeat_penalty`` 1 (its default 1.1 is not greedy decoding)."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "repeat_penalty": 1.0,
        "logit_bias": {str(int(t)): NO_TOKEN for t in no_eos_ids},
        "stream": stream,
    }


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


async def stream_one(session: Any, url: str, model: str, prompt: Sequence[int] | str, output_len: int,
                     token_ids: bool = True, api: str = "vllm", no_eos_ids: Sequence[int] = ()) -> RequestRecord:
    """Send one streaming completion and time it; never raises (a failure is a record with ``ok=False``).

    ``token_ids=False``: do not ask for ``return_token_ids``; every chunk with a choice counts as
    a token arrival and the token count comes from the final ``usage`` (as ``vllm bench serve``).
    ``api="llama.cpp"``: ``prompt`` is text; see the module's docstring for how tokens are counted there.
    """
    llama = api == "llama.cpp"
    finish: str | None = None
    t0 = time.perf_counter()
    first: float | None = None
    last: float | None = None
    itl: list[float] = []
    tokens = 0
    usage_tokens: int | None = None
    try:
        body = (llama_body(model, str(prompt), output_len, no_eos_ids) if llama
                else completion_body(model, prompt, output_len, token_ids))  # type: ignore[arg-type]
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
                if llama:  # its last chunk only says why it ended (empty text): not a token
                    finish = next((c["finish_reason"] for c in choices if c.get("finish_reason")), finish)
                    n = sum(1 for c in choices if not c.get("finish_reason"))
                else:
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
    if llama:
        if finish != "length" or tokens > output_len:
            return RequestRecord(False, tokens, first - t0, e2e, tuple(itl),
                                 f"the stream ended with finish_reason={finish!r} after {tokens} chunks, not 'length' "
                                 f"at max_tokens={output_len} (chunks carry one token or more)")
        tokens = output_len  # see the module's docstring: 'length' at max_tokens = exactly that many tokens
    elif not token_ids:
        if usage_tokens is None:
            return RequestRecord(False, 0, first - t0, e2e, tuple(itl), "no usage in the stream to count tokens from")
        tokens = usage_tokens
    elif usage_tokens is not None and usage_tokens != tokens:
        return RequestRecord(False, tokens, first - t0, e2e, tuple(itl),
                             f"chunks carried {tokens} tokens but usage says {usage_tokens}")
    return RequestRecord(True, tokens, first - t0, e2e, tuple(itl))


async def _level(url: str, model: str, prompts: Sequence[Sequence[int] | str], output_len: int, concurrency: int,
                 timeout_s: float, token_ids: bool, api: str, no_eos_ids: Sequence[int]) -> LevelResult:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=1 << 20) as session:
        async def one(p: Sequence[int] | str) -> RequestRecord:
            async with sem:
                return await stream_one(session, url, model, p, output_len, token_ids, api, no_eos_ids)

        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - t0
    return LevelResult(concurrency=concurrency, elapsed_s=elapsed, records=tuple(records))


def run_level(url: str, model: str, prompts: Sequence[Sequence[int] | str], output_len: int, concurrency: int, *,
              timeout_s: float = 600.0, token_ids: bool = True, api: str = "vllm",
              no_eos_ids: Sequence[int] = ()) -> LevelResult:
    """Send every prompt (at most ``concurrency`` in flight) and wait for all of them. ``api="llama.cpp"``: prompts are
    texts, and ``no_eos_ids`` the end-of-generation token ids to bias away."""
    if concurrency < 1:
        raise EngineError(f"concurrency must be >= 1, not {concurrency}: set LORALINE_BENCH_CONCURRENCY to levels >= 1")
    if api not in APIS:
        raise EngineError(f"unknown server API {api!r}: one of {', '.join(APIS)}")
    return asyncio.run(_level(url, model, prompts, output_len, concurrency, timeout_s, token_ids, api, no_eos_ids))


def check_usage(url: str, model: str, prompt: str, output_len: int, no_eos_ids: Sequence[int],
                timeout_s: float = 600.0) -> dict[str, int]:
    """One non-streamed llama.cpp request like :func:`stream_one`'s: the server's own ``usage`` (``prompt_tokens``,
    ``completion_tokens``) and ``finish_reason`` - what its streams do not report."""
    import httpx

    r = httpx.post(url + "/v1/completions", json=llama_body(model, prompt, output_len, no_eos_ids, stream=False),
                   timeout=timeout_s)
    if r.status_code != 200:
        raise EngineError(f"the llama.cpp server at {url} answered HTTP {r.status_code} to a completion: {r.text[:500]}")
    data = r.json()
    usage = data.get("usage") or {}
    return {"prompt_tokens": int(usage.get("prompt_tokens") or 0), "completion_tokens": int(usage.get("completion_tokens") or 0),
            "finish_reason": (data.get("choices") or [{}])[0].get("finish_reason")}
