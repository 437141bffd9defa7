"""Task evaluation: Text-to-SQL execution accuracy, scored on a real SQLite database of the task."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraline.evaluate import extract_sql, run_sql, score
from loraline.text2sql import create_database, load_examples


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    return create_database(tmp_path / "task.db")


def test_extract_sql_takes_the_first_statement() -> None:
    assert extract_sql("```sql\nSELECT name FROM employees;\n```\nThis lists names.") == "SELECT name FROM employees"
    assert extract_sql("Sure! SELECT 1; SELECT 2") == "SELECT 1"
    assert extract_sql("with t as (select 1) select * from t") == "with t as (select 1) select * from t"
    assert extract_sql("NOT NULL NOT NULL") == "NOT NULL NOT NULL"  # no SQL: kept, and it will not run


def test_score_counts_rows_not_spelling(db: Path) -> None:
    ex = load_examples("eval")[0]
    want = run_sql(db, ex.sql)
    assert want is not None
    # The reference itself, the reference reformatted, a query that fails, and a wrong query.
    answers = [ex.sql, "```sql\n" + ex.sql.replace("SELECT ", "select\n  ", 1) + "\n```", "SELECT nope FROM nowhere", "SELECT 42"]
    s = score("merged", [(ex.question, ex.sql)] * 4, answers, db, seconds=0.1)
    assert [(i.valid, i.correct) for i in s.items] == [(True, True), (True, True), (False, False), (True, want == [(42,)])]
    assert s.correct == 2 and s.accuracy == 0.5 and s.valid == 3


def test_model_sql_cannot_change_or_hang_the_database(db: Path) -> None:
    before = run_sql(db, "SELECT count(*) FROM sqlite_master")
    assert run_sql(db, "DROP TABLE employees") is None  # read-only: refused
    assert run_sql(db, "SELECT count(*) FROM sqlite_master") == before
    # A runaway recursive query is cut off by the time limit (or the row limit) instead of hanging the release.
    assert run_sql(db, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c") is None


@pytest.mark.slow
def test_served_evaluation_asks_like_a_users_openai_client(demo_merged, vllm_python: Path, settings) -> None:
    """The served task evaluation: vLLM's OpenAI server with an API key, asked through the official openai client; its
    answers (chat template applied server-side) are the merged model's HF greedy answers, and streaming changes none."""
    import secrets

    import openai

    from loraline.evaluate import STREAM_CHECKS, eval_questions, evaluate_served, generate_answers
    from loraline.server import serve_openai

    _adapter, _base, merged = demo_merged
    key = secrets.token_urlsafe(16)
    with serve_openai(merged.path, settings, served_model_name="smol-sql", extra_args=[f"--api-key={key}"]) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError):
                evaluate_served(stranger, "smol-sql", settings)
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0) as client:
            served = evaluate_served(client, "smol-sql", settings)

    questions = eval_questions(settings)
    assert served.score.examples == len(questions) == settings.eval_examples == 8
    assert served.streamed == STREAM_CHECKS and served.stream_mismatches == ()
    # What the server answers is what the release measured on the merged model (same chat template, greedy).
    hf = generate_answers(merged.path, merged.path, [q for q, _ in questions], settings)
    served_sql = [i.predicted for i in served.score.items]
    hf_sql = [extract_sql(a) for a in hf]
    same = sum(a == b for a, b in zip(served_sql, hf_sql))
    assert same >= len(questions) // 2, list(zip(served_sql, hf_sql))
    assert served.summary()["stream_identical"] == STREAM_CHECKS and served.summary()["model"] == "smol-sql"


def test_base_answers_are_kept_per_base_digest_and_reused(demo_merged, settings) -> None:
    """The second release on a base reads the base's answers instead of generating them again; another base digest
    (or other questions) does not."""
    import json

    from loraline.evaluate import evaluate_release

    _adapter, base, merged = demo_merged
    s = settings.model_copy(update={"eval_examples": 4})
    first = evaluate_release(merged.path, base.path, s, base_sha256=base.sha256)
    kept = list((s.home / "evals").glob("base-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["base_sha256"] == base.sha256
    # Put answers in the kept file that the base never gave: the next evaluation must score exactly those.
    data = json.loads(kept[0].read_text())
    data["answers"] = ["SELECT COUNT(*) FROM employees;"] * len(data["answers"])
    kept[0].write_text(json.dumps(data))
    again = evaluate_release(merged.path, base.path, s, base_sha256=base.sha256)
    assert [i.predicted for i in again.base.items] == ["SELECT COUNT(*) FROM employees"] * 4
    assert [i.predicted for i in again.merged.items] == [i.predicted for i in first.merged.items]  # merged: generated
    other = evaluate_release(merged.path, base.path, s, base_sha256="0" * 64)  # another base: generated, kept apart
    assert [i.predicted for i in other.base.items] == [i.predicted for i in first.base.items]
    assert len(list((s.home / "evals").glob("base-*.json"))) == 2
    fewer = evaluate_release(merged.path, base.path, s.model_copy(update={"eval_examples": 2}), base_sha256=base.sha256)
    assert [i.predicted for i in fewer.base.items] == [i.predicted for i in first.base.items[:2]]  # other questions
