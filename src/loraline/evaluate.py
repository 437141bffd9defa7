"""Task evaluation: Text-to-SQL execution accuracy of the merged model, and of the base for comparison.

Each eval question (:func:`loraline.text2sql.load_examples`, split ``eval``) is answered greedily by
the model with the chat template the release ships; the first SQL statement of the answer is run on a
fresh read-only SQLite database of the task's schema and seed rows, and counts as correct when it
returns the same rows as the reference SQL (as a multiset: row order is ignored unless the reference
orders them). A statement that fails, runs over :data:`SQL_TIME_LIMIT_S` or returns more than
:data:`SQL_ROW_LIMIT` rows counts as wrong. No model output is ever executed anywhere but there.

The served container is scored the same way (:func:`evaluate_served`, run by the smoke test of each image while its
container runs): the same questions as chat messages through the official ``openai`` client — what a user's client
sends — greedy, with the chat template the image ships applied by vLLM server-side. Every question is asked plainly;
the first :data:`STREAM_CHECKS` are also streamed, and a streamed answer must equal the plain one.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from loraline.hf_models import greedy
from loraline.settings import Settings

SQL_TIME_LIMIT_S = 5.0
SQL_ROW_LIMIT = 10_000
STREAM_CHECKS = 3  # served questions also asked streaming: the streamed answer must equal the plain one
SERVED_CONCURRENCY = 8  # served questions in flight at once (the server batches them)


@dataclass(frozen=True)
class EvalItem:
    question: str
    reference: str
    predicted: str
    valid: bool  # the predicted SQL ran
    correct: bool  # ... and returned the reference's rows


@dataclass(frozen=True)
class EvalScore:
    model: str  # "merged" | "base"
    examples: int
    correct: int
    valid: int
    seconds: float
    items: tuple[EvalItem, ...] = field(default=())

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else 0.0

    def summary(self) -> dict[str, Any]:
        return {"examples": self.examples, "correct": self.correct, "valid": self.valid,
                "accuracy": round(self.accuracy, 4), "seconds": round(self.seconds, 2)}


@dataclass(frozen=True)
class EvalReport:
    merged: EvalScore
    base: EvalScore
    max_new_tokens: int

    @property
    def gain(self) -> float:
        return self.merged.accuracy - self.base.accuracy

    def summary(self) -> dict[str, Any]:
        # served_accuracy/served: filled in by the smoke test of a serving image (with_served); None until one ran.
        return {"task": "text2sql-execution", "accuracy": round(self.merged.accuracy, 4),
                "base_accuracy": round(self.base.accuracy, 4), "gain": round(self.gain, 4),
                "examples": self.merged.examples, "valid_sql": self.merged.valid, "max_new_tokens": self.max_new_tokens,
                "served_accuracy": None, "served": None}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "merged": asdict(self.merged), "base": asdict(self.base)}


@dataclass(frozen=True)
class ServedEval:
    """The task evaluation of a running serving container, asked through the ``openai`` client."""

    model: str  # the served model name the client asked for
    score: EvalScore
    streamed: int  # questions also asked streaming
    stream_mismatches: tuple[tuple[str, str, str], ...]  # (question, plain answer, streamed answer) that differ
    max_new_tokens: int

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, **self.score.summary(), "streamed": self.streamed,
                "stream_identical": self.streamed - len(self.stream_mismatches), "max_new_tokens": self.max_new_tokens}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "items": [asdict(i) for i in self.score.items],
                "stream_mismatches": [list(m) for m in self.stream_mismatches]}


def with_served(evaluation: dict[str, Any] | None, served: dict[str, Any]) -> dict[str, Any] | None:
    """The lineage's ``evaluation`` section with a serving image's evaluation (``served``: :meth:`ServedEval.summary`
    plus the image's ``mode`` and ``pinned``) as ``served_accuracy`` and ``served``. None when the release was never
    evaluated (LORALINE_EVAL=false): the served score then stays on the image's smoke record only."""
    if not evaluation:
        return evaluation
    return {**evaluation, "served_accuracy": served["accuracy"], "served": served}


def extract_sql(text: str) -> str:
    """The first SQL statement of a model answer (code fences and chatter around it dropped)."""
    fenced = re.search(r"```(?:sql)?\s*(.*?)```", text, flags=re.S | re.I)
    body = fenced.group(1) if fenced else text
    m = re.search(r"\b(SELECT|WITH)\b.*", body, flags=re.S | re.I)
    if not m:
        return body.strip()
    return m.group(0).split(";", 1)[0].strip()


def run_sql(db: Path, sql: str) -> list[tuple] | None:
    """Rows of ``sql`` on ``db`` opened read-only, or None when it fails, is too slow or returns too much."""
    con = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)
    deadline = time.monotonic() + SQL_TIME_LIMIT_S
    con.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)  # non-zero aborts the query
    try:
        cur = con.execute(sql)
        rows = cur.fetchmany(SQL_ROW_LIMIT + 1)
        return None if len(rows) > SQL_ROW_LIMIT else rows
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        con.close()


def same_result(reference_sql: str, got: list[tuple] | None, want: list[tuple] | None) -> bool:
    if got is None or want is None:
        return False
    if re.search(r"\border\s+by\b", reference_sql, flags=re.I):
        return got == want
    return Counter(got) == Counter(want)


def score(model: str, questions: list[tuple[str, str]], answers: list[str], db: Path, seconds: float) -> EvalScore:
    items = []
    for (q, ref), ans in zip(questions, answers, strict=True):
        sql = extract_sql(ans)
        got = run_sql(db, sql) if sql else None
        items.append(EvalItem(q, ref, sql, got is not None, same_result(ref, got, run_sql(db, ref))))
    return EvalScore(model, len(items), sum(i.correct for i in items), sum(i.valid for i in items), seconds, tuple(items))


def generate_answers(model_dir: Path, tokenizer_dir: Path, questions: list[str], settings: Settings, batch: int = 8) -> list[str]:
    """Greedy answers of the model at ``model_dir`` (transformers, safetensors only) to each question."""
    import torch

    from loraline.hf_models import load_causal_lm, load_tokenizer
    from loraline.text2sql import render_prompt

    tok = load_tokenizer(tokenizer_dir, tokenizer_dir, settings)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = load_causal_lm(model_dir, settings)
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(questions), batch):
            prompts = [render_prompt(tok, q) for q in questions[i:i + batch]]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = greedy(model, enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=settings.eval_max_new_tokens, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def eval_questions(settings: Settings) -> list[tuple[str, str]]:
    """(question, reference SQL) of the first ``eval_examples`` eval questions: what every evaluation asks."""
    from loraline.text2sql import load_examples

    return [(e.question, e.sql) for e in load_examples("eval")[: settings.eval_examples]]


def _base_answers_key(base_sha256: str, tokenizer_dir: Path, questions: list[tuple[str, str]], settings: Settings) -> str:
    """What the base's answers depend on: its weights (digest), the tokenizer and chat template the prompts are rendered
    with, the questions and the generation settings, and the libraries that generate."""
    import hashlib

    import torch
    import transformers

    files = sorted(p for p in Path(tokenizer_dir).iterdir()
                   if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges"))))
    h = hashlib.sha256()
    h.update(json.dumps({"base": base_sha256, "questions": questions, "max_new_tokens": settings.eval_max_new_tokens,
                         "torch": torch.__version__, "transformers": transformers.__version__}).encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def evaluate_release(merged_dir: Path, base_dir: Path, settings: Settings, base_sha256: str | None = None) -> EvalReport:
    """Execution accuracy of the merged model and of the base on the first ``eval_examples`` eval questions.

    With ``base_sha256`` (the base's content digest), the base's answers are kept under ``<home>/evals/`` and reused by
    the next release on the same base, tokenizer, questions and settings: every adapter of a base is compared with the
    same base answers, and only the merged model is generated again (half the evaluation's time).
    """
    from loraline.text2sql import create_database

    questions = eval_questions(settings)
    cache = None
    if base_sha256:
        cache = settings.home / "evals" / f"base-{_base_answers_key(base_sha256, Path(merged_dir), questions, settings)}.json"
    with tempfile.TemporaryDirectory() as tmp:
        db = create_database(Path(tmp) / "task.db")
        scores = []
        for name, model_dir in (("merged", merged_dir), ("base", base_dir)):
            t = time.perf_counter()
            if name == "base" and cache is not None and cache.is_file():
                kept = json.loads(cache.read_text())
                answers, seconds = list(kept["answers"]), float(kept["seconds"])
            else:
                # The merged model's tokenizer (and chat template) for both: the prompt is the same, only the weights differ.
                answers = generate_answers(Path(model_dir), Path(merged_dir), [q for q, _ in questions], settings)
                seconds = time.perf_counter() - t
                if name == "base" and cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    stage = cache.with_suffix(f".{os.getpid()}.tmp")
                    stage.write_text(json.dumps({"base_sha256": base_sha256, "answers": answers, "seconds": seconds}))
                    stage.replace(cache)  # atomic: a concurrent release reads a whole file or none
            scores.append(score(name, questions, answers, db, seconds))
    return EvalReport(merged=scores[0], base=scores[1], max_new_tokens=settings.eval_max_new_tokens)


def ask_served(client: Any, model: str, question: str, max_new_tokens: int, *, stream: bool,
               limit: str = "max_completion_tokens") -> str:
    """One greedy chat completion of ``question`` (as :func:`loraline.text2sql.chat_messages`) from an OpenAI-compatible
    server through ``client`` (an ``openai.OpenAI``), plain or streamed; the answer's text. ``limit``: the request field
    that bounds the answer (llama-cpp-python's server knows only the older ``max_tokens``)."""
    from loraline.text2sql import chat_messages

    kw: dict[str, Any] = {"model": model, "messages": chat_messages(question), "temperature": 0.0,
                          limit: max_new_tokens}
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content or ""
    parts: list[str] = []
    with client.chat.completions.create(**kw, stream=True) as chunks:
        for chunk in chunks:
            parts += [c.delta.content or "" for c in chunk.choices if c.delta is not None]
    return "".join(parts)


def evaluate_served(client: Any, model: str, settings: Settings, progress: Callable[[str], None] = lambda _m: None,
                    limit: str = "max_completion_tokens") -> ServedEval:
    """Execution accuracy of the served ``model`` (a running vLLM OpenAI server, through ``client``, an ``openai.OpenAI``
    with its base URL and API key) on the same questions as :func:`evaluate_release`, scored the same way. The first
    :data:`STREAM_CHECKS` questions are asked again streaming; answers that differ are returned in
    ``stream_mismatches`` (the caller decides whether that fails)."""
    from concurrent.futures import ThreadPoolExecutor

    from loraline.text2sql import create_database

    questions = eval_questions(settings)
    n = settings.eval_max_new_tokens
    streamed = questions[:STREAM_CHECKS]
    t = time.perf_counter()
    # The questions asked again streaming go one at a time, as their streamed copies do (the same batch: the same
    # greedy answer); the rest SERVED_CONCURRENCY at once, as clients use a server (one at a time, 50 answers of the
    # real demo took 53 s here).
    answers = [ask_served(client, model, q, n, stream=False, limit=limit) for q, _ in streamed]
    with ThreadPoolExecutor(SERVED_CONCURRENCY) as pool:
        answers += pool.map(lambda qa: ask_served(client, model, qa[0], n, stream=False, limit=limit), questions[len(streamed):])
    seconds = time.perf_counter() - t
    progress(f"served {model}: {len(answers)} answers in {seconds:.1f} s ({SERVED_CONCURRENCY} at once after the first "
             f"{len(streamed)}); {len(streamed)} asked again streaming")
    mismatches = []
    for (q, _), plain in zip(streamed, answers):
        got = ask_served(client, model, q, n, stream=True, limit=limit)
        if got != plain:
            mismatches.append((q, plain, got))
    with tempfile.TemporaryDirectory() as tmp:
        db = create_database(Path(tmp) / "task.db")
        result = score(f"served:{model}", questions, answers, db, seconds)
    return ServedEval(model, result, len(streamed), tuple(mismatches), n)
