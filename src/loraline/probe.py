"""Waiting for something to come up: one health probe and one readiness loop for every server loraline starts or
runs (the services' Docker engine, registry, MLflow and Prefect servers and deployment runner, vLLM's OpenAI server,
the serving container). Each caller raises its own error, with its own log, from what :func:`wait_until` saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable


def http_ok(url: str, timeout_s: float = 3.0, get: Callable[..., Any] | None = None) -> bool:
    """Does ``GET url`` answer 200? Not listening, refused, timed out: False. ``get``: a client's ``get`` (headers,
    keys); httpx's by default."""
    import httpx

    try:
        return (get or httpx.get)(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class Waited:
    ready: bool  # ready() said yes
    seconds: float  # from the start of the wait to its end
    gone: str | None = None  # why the thing waited for stopped (it exited), when it did


def wait_until(ready: Callable[[], bool], timeout_s: float, *, interval_s: float = 0.5,
               gone: Callable[[], str | None] = lambda: None) -> Waited:
    """Ask ``ready`` every ``interval_s`` until it says yes, ``gone`` gives a reason the thing stopped (a process or
    container that exited: no point waiting), or ``timeout_s`` passed."""
    t0 = time.monotonic()
    while True:
        if ready():
            return Waited(True, time.monotonic() - t0)
        if (why := gone()) is not None:
            return Waited(False, time.monotonic() - t0, why)
        if time.monotonic() - t0 > timeout_s:
            return Waited(False, time.monotonic() - t0)
        time.sleep(interval_s)
