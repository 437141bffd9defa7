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
