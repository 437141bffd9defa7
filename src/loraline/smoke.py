"""The smoke test of a pushed serving image: pull it by digest, run it, ask it, stop it.

``docker run --network host --ipc=host REPO@sha256:...`` (vLLM needs more shared memory than
Docker's 64 MiB default) with the server bound to 127.0.0.1 on a free port; wait for ``/health``;
``/v1/models`` must list the served name; then chat completions on the fixed parity prompts,
plain and streaming, greedy, with ``logprobs``: each answer must agree with the merged model's HF
greedy output under the parity rule (:func:`loraline.parity.judge`). The container is always
stopped and removed.

While the container runs, the release's task evaluation is run against it too (:func:`loraline.evaluate.evaluate_served`,
unless LORALINE_EVAL=false): the eval questions through the official ``openai`` client with the container's key, as a
user's client asks them; its accuracy is what the image serves (``evaluation.served_accuracy`` in the lineage). A
streamed answer that differs from the plain one fails the smoke test.

The container runs with an API key (``-e VLLM_API_KEY``, a fresh random one per smoke test, never
logged): ``/v1/models`` must answer 401 without it, ``/health`` must answer without it (vLLM's key
guards ``/v1`` — and ``/v2``, ``/inference`` — only), and every other request carries it.

A llama.cpp image (``--image gguf``) is run the same way (its key in ``-e API_KEY``, ready when ``/openapi.json``
answers) and asked through the ``openai`` client: chat, plain and streamed, then the task questions
(:func:`smoke_test_gguf`).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

from loraline.errors import ImageError
from loraline.evaluate import ServedEval
from loraline.image import Image, docker_client
from loraline.oci import auth_config
from loraline.parity import Generation, ParityReport, report
from loraline.probe import http_ok, wait_until
from loraline.settings import Settings


def _generation(content: Sequence[dict[str, Any]], text: str) -> Generation:
    """A Generation from OpenAI chat ``logprobs.content`` entries (tokens as ``token_id:N``)."""
    def tid(tok: str) -> int:
        if not tok.startswith("token_id:"):
            raise ImageError(f"the server returned token {tok!r} instead of token_id:N: is it vLLM's OpenAI server?")
        return int(tok.split(":", 1)[1])

    return Generation(
        tokens=tuple(tid(c["token"]) for c in content),
        logprobs=tuple(float(c["logprob"]) for c in content),
        top=tuple({tid(t["token"]): float(t["logprob"]) for t in c.get("top_logprobs") or []} for c in content),
        text=text,
    )


def chat(http: Any, url: str, model: str, messages: list[dict[str, str]], settings: Settings, *, stream: bool) -> Generation:
    """One greedy chat completion with per-token logprobs, plain or streamed (SSE)."""
    body = {"model": model, "messages": messages, "max_tokens": settings.parity_max_new_tokens, "temperature": 0.0,
            "logprobs": True, "top_logprobs": settings.parity_top_k, "return_tokens_as_token_ids": True,
            "stream": stream}
    if not stream:
        r = http.post(f"{url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise ImageError(f"POST /v1/chat/completions answered {r.status_code}: {r.text[:300]}")
        choice = r.json()["choices"][0]
        return _generation(choice["logprobs"]["content"], choice["message"]["content"] or "")
    content: list[dict[str, Any]] = []
    text = []
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise ImageError(f"POST /v1/chat/completions (stream) answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                text.append((choice.get("delta") or {}).get("content") or "")
                content.extend((choice.get("logprobs") or {}).get("content") or [])
    return _generation(content, "".join(text))


def reference(merged_dir: Path, questions: Sequence[str], settings: Settings) -> list[Generation]:
    """The merged model's HF greedy outputs on the chat-rendered questions (what the image must reproduce)."""
    from loraline.hf_models import load_tokenizer
    from loraline.parity import encode_prompts, hf_generations
    from loraline.text2sql import render_prompt

    tok = load_tokenizer(merged_dir, merged_dir, settings)
    return hf_generations(merged_dir, encode_prompts(tok, [render_prompt(tok, q) for q in questions]), settings)


# How each kind of image is run and asked: the environment variable its server reads its API key from, and the route
# that answers once it is ready (without the key). llama-cpp-python's server has no /health: it listens once the model
# is loaded, and /openapi.json is not guarded by its key.
SERVERS = {"vllm": {"key_env": "VLLM_API_KEY", "ready": "/health"}, "llama.cpp": {"key_env": "API_KEY", "ready": "/openapi.json"}}


def server_of(image: Image) -> str:
    return "llama.cpp" if image.mode == "gguf" else "vllm"


# The openai client's own retries (2, its default; with its backoff) for the smoke test's requests: greedy answers are
# safe to ask again, and a connection the server's keep-alive timeout closed just as the next request went out fails
# that request with "Connection error." (seen once in CI, the container up and answering 200 before and after).
# A server that is down still fails the smoke test, after the retries.
CLIENT_RETRIES = 2


@contextmanager
def running(image: Image, settings: Settings, progress: Callable[[str], None] = lambda _m: None) -> Iterator[dict[str, Any]]:
    """``image`` pulled by digest and run on a free port of 127.0.0.1 with a fresh API key, until its server is ready;
    yields ``{url, http (an httpx.Client sending the key), api_key, container, pull_seconds, ready_seconds}``; the
    container is stopped and removed after. A failure inside says what the container logged."""
    import httpx
    from docker.errors import APIError

    from loraline.server import free_port

    server = SERVERS[server_of(image)]
    client = docker_client(settings)
    container = None
    try:
        t0 = time.perf_counter()
        try:
            client.images.pull(image.pinned, auth_config=auth_config(settings.registry_auth))
        except APIError as e:
            raise ImageError(f"pulling {image.pinned} back from the registry failed: {e.explanation or e}") from e
        pull_s = time.perf_counter() - t0
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        progress(f"docker run {image.pinned} on 127.0.0.1:{port}")
        t0 = time.perf_counter()
        api_key = secrets.token_urlsafe(24)  # the container's only; gone with it
        container = client.containers.run(
            image.pinned, command=["--host", "127.0.0.1", "--port", str(port)], detach=True, network_mode="host",
            ipc_mode="host", name=f"loraline-smoke-{uuid.uuid4().hex[:8]}", labels={"org.loraline.smoke": image.ref},
            environment={server["key_env"]: api_key},
        )
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {api_key}"}) as http, _with_log(container):
            ready_s = _wait_ready(http, url, container, settings.smoke_timeout_s, t0, server["ready"])
            progress(f"ready in {ready_s:.1f} s")
            yield {"url": url, "http": http, "api_key": api_key, "container": container, "pull_seconds": pull_s,
                   "ready_seconds": ready_s}
    finally:
        if container is not None:
            try:
                container.stop(timeout=20)
            finally:
                container.remove(force=True)
        client.close()


def _guarded(image: Image, url: str, http: Any) -> tuple[int, list[str]]:
    """``/v1/models`` must refuse a request without the key (401) and list the served name with it."""
    import httpx

    unauthorized = httpx.get(f"{url}/v1/models", timeout=30).status_code
    if unauthorized != 401:
        raise ImageError(f"{image.pinned} answered {unauthorized} to /v1/models without its API key "
                         f"({SERVERS[server_of(image)]['key_env']} was set): the served endpoint is not guarded")
    models = [m["id"] for m in http.get(f"{url}/v1/models").json().get("data", [])]
    if image.served_model_name not in models:
        raise ImageError(f"{image.pinned} serves {models}, not {image.served_model_name!r}")
    return unauthorized, models


def smoke_test(image: Image, merged_dir: Path, settings: Settings, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Pull ``image`` by digest, run it, check it answers like the merged model; the container is removed after.
    A gguf image (llama.cpp) is checked by :func:`smoke_test_gguf`."""
    from loraline.parity import require_parity
    from loraline.text2sql import chat_messages, load_examples

    if image.mode == "gguf":
        return smoke_test_gguf(image, settings, progress)
    questions = [e.question for e in load_examples("eval")[: settings.parity_prompts]]
    progress(f"HF greedy reference of the merged model on {len(questions)} prompts")
    expected = reference(merged_dir, questions, settings)

    with running(image, settings, progress) as run:
        url, http, container = run["url"], run["http"], run["container"]
        unauthorized, models = _guarded(image, url, http)
        reports: list[ParityReport] = []
        for stream in (False, True):
            t1 = time.perf_counter()
            got = [chat(http, url, image.served_model_name, chat_messages(q), settings, stream=stream) for q in questions]
            reports.append(report("hf-merged", f"image-{image.mode}" + ("-stream" if stream else ""), questions, expected,
                                  got, top_k=settings.parity_top_k, max_new_tokens=settings.parity_max_new_tokens,
                                  seconds=time.perf_counter() - t1))
        user = container.attrs.get("Config", {}).get("User", "")
        for rep in reports:
            require_parity(rep)
        served = evaluate_image(image, f"{url}/v1", run["api_key"], settings, progress) if settings.eval else None
    out = {"pinned": image.pinned, "pull_seconds": round(run["pull_seconds"], 2), "ready_seconds": round(run["ready_seconds"], 2),
           "served_models": models, "user": user, "v1_status_without_key": unauthorized, "parity": {r.b: r.summary() for r in reports},
           "answers": [r.b_text for r in reports[0].results]}
    if served is not None:
        out["evaluation"] = {"mode": image.mode, "pinned": image.pinned, **served.to_dict()}
    return out


# Chat questions a llama.cpp image answers plain and streamed before the task questions. Few: its server answers one
# request at a time (8 questions twice took 71 s on 2 busy cores), and the task evaluation streams 3 more.
GGUF_CHAT_CHECKS = 2


def smoke_test_gguf(image: Image, settings: Settings, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """The smoke test of a llama.cpp image (``--image gguf``): pulled by digest and run; ``/v1/models`` guarded by its
    key and listing the served name; greedy chat answers to :data:`GGUF_CHAT_CHECKS` questions through the official
    ``openai`` client, plain and streamed (a streamed answer that differs from the plain one fails it); then the task
    questions (:func:`evaluate_image`, unless LORALINE_EVAL=false). Its parity with the merged model is the GGUF
    export's (recorded with the file), not checked again here: llama-cpp-python's server returns no token ids to compare."""
    import openai

    from loraline.evaluate import ask_served
    from loraline.text2sql import load_examples

    questions = [e.question for e in load_examples("eval")[: min(GGUF_CHAT_CHECKS, settings.parity_prompts)]]
    with running(image, settings, progress) as run:
        url, http, container = run["url"], run["http"], run["container"]
        unauthorized, models = _guarded(image, url, http)
        n = settings.parity_max_new_tokens
        t1 = time.perf_counter()
        try:
            with openai.OpenAI(base_url=f"{url}/v1", api_key=run["api_key"], timeout=120, max_retries=CLIENT_RETRIES) as client:
                plain = [ask_served(client, image.served_model_name, q, n, stream=False, limit="max_tokens") for q in questions]
                streamed = [ask_served(client, image.served_model_name, q, n, stream=True, limit="max_tokens") for q in questions]
        except openai.OpenAIError as e:
            raise ImageError(f"chat with {image.pinned} through the openai client failed: {e}") from e
        chat_s = time.perf_counter() - t1
        differ = [(q, a, b) for q, a, b in zip(questions, plain, streamed) if a != b]
        if differ:
            q, a, b = differ[0]
            raise ImageError(f"{image.pinned}: {len(differ)} of {len(questions)} streamed chat answers differ from the "
                             f"plain (greedy) ones, e.g. {q!r}: plain {a[:200]!r}, streamed {b[:200]!r}")
        if not any(a.strip() for a in plain):
            raise ImageError(f"{image.pinned} answered {len(questions)} chat questions with empty text")
        progress(f"chat: {len(questions)} greedy answers, streamed = plain, in {chat_s:.1f} s")
        user = container.attrs.get("Config", {}).get("User", "")
        served = evaluate_image(image, f"{url}/v1", run["api_key"], settings, progress) if settings.eval else None
    out = {"pinned": image.pinned, "pull_seconds": round(run["pull_seconds"], 2), "ready_seconds": round(run["ready_seconds"], 2),
           "served_models": models, "user": user, "v1_status_without_key": unauthorized,
           "chat": {"prompts": len(questions), "stream_identical": len(questions), "seconds": round(chat_s, 2),
                    "max_tokens": n},
           "answers": plain}
    if served is not None:
        out["evaluation"] = {"mode": image.mode, "pinned": image.pinned, **served.to_dict()}
    return out


def evaluate_image(image: Image, base_url: str, api_key: str, settings: Settings,
                   progress: Callable[[str], None] = lambda _m: None) -> ServedEval:
    """The task evaluation of the running container of ``image`` at ``base_url`` (``http://HOST:PORT/v1``), asked
    through the official ``openai`` client with the container's API key, as a user's client would."""
    import openai

    from loraline.evaluate import evaluate_served

    progress(f"task evaluation of the served {image.served_model_name!r} through the openai client")
    try:
        with openai.OpenAI(base_url=base_url, api_key=api_key, timeout=120, max_retries=CLIENT_RETRIES) as client:
            served = evaluate_served(client, image.served_model_name, settings, progress,
                                     limit="max_tokens" if image.mode == "gguf" else "max_completion_tokens")
    except openai.OpenAIError as e:
        raise ImageError(f"the task evaluation of {image.pinned} through the openai client failed: {e}") from e
    if served.stream_mismatches:
        q, plain, streamed = served.stream_mismatches[0]
        raise ImageError(f"{image.pinned}: {len(served.stream_mismatches)} of {served.streamed} streamed answers differ from "
                         f"the plain (greedy) answer to the same question, e.g. {q!r}: plain {plain[:200]!r}, "
                         f"streamed {streamed[:200]!r}")
    progress(f"served accuracy {served.score.accuracy:.1%} ({served.score.correct} of {served.score.examples}, "
             f"{served.score.valid} ran); {served.streamed} streamed answers equal the plain ones")
    return served


@contextmanager
def _with_log(container: Any) -> Iterator[None]:
    """A smoke failure says what the server logged (its last error lines), not only what the client saw."""
    import httpx

    try:
        yield
    except (ImageError, httpx.HTTPError) as e:
        if "container log" in str(e) or "before /" in str(e):
            raise
        try:  # did it exit (a signal, the OOM killer) or does it still run? (a connection error alone does not say)
            container.reload()
            st = container.attrs.get("State", {})
            state = (f"container {st.get('Status')}, exit code {st.get('ExitCode')}, OOM-killed {st.get('OOMKilled')}"
                     + (f", error {st.get('Error')!r}" if st.get("Error") else ""))
            lines = container.logs(tail=200).decode(errors="replace").splitlines()
        except Exception as gone:  # noqa: BLE001 - the diagnosis must not hide the failure
            state, lines = f"container state unavailable: {gone}", []
        errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln][-8:] or lines[-8:]
        raise ImageError(f"{e}\n{state}; container log (last error lines):\n" + "\n".join(errors)
                         + ("\ncontainer log (last lines):\n" + "\n".join(lines[-15:]) if lines else "")) from e


def _wait_ready(http: Any, url: str, container: Any, timeout_s: float, t0: float, ready: str = "/health") -> float:
    """Seconds from ``t0`` (the container's start) until its ``ready`` route (``/health``) answers 200."""
    def exited() -> str | None:
        container.reload()
        return f"exited ({container.attrs['State'].get('ExitCode')})" if container.status in ("exited", "dead") else None

    w = wait_until(lambda: http_ok(f"{url}{ready}", 5.0, http.get), t0 + timeout_s - time.perf_counter(),
                   interval_s=1.0, gone=exited)
    if w.ready:
        return time.perf_counter() - t0
    logs = container.logs(tail=30).decode(errors="replace")
    if w.gone:
        raise ImageError(f"the container of {container.image.tags or container.image.id} {w.gone} before {ready} "
                         f"answered:\n{logs}")
    raise ImageError(f"the container did not answer {ready} within {timeout_s:.0f} s (LORALINE_SMOKE_TIMEOUT_S):\n{logs}")
