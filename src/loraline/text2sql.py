"""A small Text-to-SQL task: a SQLite schema with seed data and question/SQL pairs.

The data ships as package data (``loraline/data/text2sql``): ``schema.sql`` holds the
CREATE TABLE statements followed by INSERTs of seed rows, and ``pairs.jsonl`` holds
one ``{"question": ..., "sql": ..., "split": "train" or "eval"}`` object per line. Every SQL statement runs on a
database built by :func:`create_database`.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

__all__ = [
    "Example",
    "chat_messages",
    "create_database",
    "execute_sql",
    "load_examples",
    "render_prompt",
    "question_kind",
    "schema_compact",
    "schema_ddl",
]

_DATA = "loraline.data.text2sql"

# Kept short: it is repeated in every prompt (and in every training example).
_INSTRUCTION = (
    "You translate questions into SQLite queries. "
    "Answer with one SQL statement and nothing else. The database schema:"
)



@dataclass(frozen=True)
class Example:
    """One question with the SQL that answers it."""

    question: str
    sql: str


def _read(name: str) -> str:
    return files(_DATA).joinpath(name).read_text(encoding="utf-8")


@cache
def _schema_sql() -> str:
    return _read("schema.sql")


@cache
def schema_ddl() -> str:
    """Return only the CREATE TABLE statements of the schema (the text put in prompts)."""
    # Non-greedy up to the first ");" that ends a line: the tables' columns contain no ");".
    statements = re.findall(r"^CREATE TABLE .*?^\);", _schema_sql(), flags=re.S | re.M)
    if not statements:  # a broken data file must not yield an empty prompt silently
        raise RuntimeError(f"no CREATE TABLE statement found in {_DATA}/schema.sql")
    return "\n\n".join(statements)


@cache
def schema_compact() -> str:
    """The schema as one line per table, ``table(column, column, ...)``: what prompts carry.

    Derived from :func:`schema_ddl`, so the two cannot disagree. Types, keys and comments are dropped: the
    prompt is repeated in every training example and every request, and at ~70 tokens (the DDL is ~300) it
    is most of what a training step costs; the column names are what a query needs.
    """
    lines = []
    for statement in schema_ddl().split("\n\n"):
        table = re.match(r"CREATE TABLE (\w+)", statement)
        if table is None:  # schema_ddl only returns CREATE TABLE statements
            raise RuntimeError(f"unexpected statement in {_DATA}/schema.sql: {statement[:60]!r}")
        columns = [m.group(1) for line in statement.splitlines()[1:-1]
                   if (m := re.match(r"\s*(\w+)\s+\w+", line)) and m.group(1) not in ("PRIMARY", "FOREIGN", "UNIQUE", "CHECK")]
        lines.append(f"{table.group(1)}({', '.join(columns)})")
    return "\n".join(lines)


def question_kind(sql: str) -> str:
    """The kind of question a reference SQL answers, from its shape: ``self-join``, ``group-having``,
    ``group-by``, ``subquery``, ``top-n`` (ORDER BY ... LIMIT), ``order-by``, ``join3-aggregate``, ``join3``,
    ``join-aggregate``, ``join``, ``count``, ``aggregate``, ``date``, ``pattern`` (LIKE / BETWEEN) or ``lookup``.
    Used to report the eval split per kind and to keep every kind in both splits."""
    s = " ".join(sql.upper().split())
    joins = s.count(" JOIN ")
    agg = re.search(r"\b(COUNT|SUM|AVG|MIN|MAX)\(", s) is not None
    if re.search(r"JOIN EMPLOYEES M\b", s):
        return "self-join"
    if " HAVING " in s:
        return "group-having"
    if " GROUP BY " in s:
        return "group-by"
    if "(SELECT " in s:
        return "subquery"
    if " ORDER BY " in s:
        return "top-n" if " LIMIT " in s else "order-by"
    if joins >= 2:
        return "join3-aggregate" if agg else "join3"
    if joins == 1:
        return "join-aggregate" if agg else "join"
    if "COUNT(" in s:
        return "count"
    if agg:
        return "aggregate"
    if "STRFTIME(" in s or "_DATE " in s:
        return "date"
    if " LIKE " in s or " BETWEEN " in s:
        return "pattern"
    return "lookup"


@cache
def _all_examples() -> tuple[tuple[Example, str], ...]:
    rows = [json.loads(line) for line in _read("pairs.jsonl").splitlines() if line.strip()]
    return tuple((Example(question=r["question"], sql=r["sql"]), r["split"]) for r in rows)


def load_examples(split: str = "all") -> list[Example]:
    """Return the question/SQL pairs of ``split``: ``"all"``, ``"train"`` or ``"eval"``.

    Each pair names its split in ``pairs.jsonl``. The eval pairs are held-out questions of kinds the train split
    teaches: of every query shape (the SQL with its literal values masked) that occurs at least 3 times, the last
    occurrence is held out; no eval question or SQL statement occurs in training (tests/test_demo.py checks it).
    """
    if split not in ("all", "train", "eval"):
        raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")
    return [e for e, s in _all_examples() if split in ("all", s)]


def chat_messages(question: str) -> list[dict[str, str]]:
    """Return the chat for ``question``: a system message with the compact schema, then the user turn.

    This is also what a client of the served model sends (the smoke test and the served evaluation do)."""
    return [
        {"role": "system", "content": f"{_INSTRUCTION}\n{schema_compact()}"},
        {"role": "user", "content": question},
    ]


def render_prompt(tokenizer: Any, question: str) -> str:
    """Render ``question`` with the tokenizer's chat template, ending with the assistant header."""
    return tokenizer.apply_chat_template(
        chat_messages(question), add_generation_prompt=True, tokenize=False
    )


def create_database(path: Path) -> Path:
    """Create a SQLite database at ``path`` from the full schema (tables and seed rows).

    An existing file at ``path`` is replaced, so the result always holds exactly the seed data.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    try:
        con.executescript(_schema_sql())
        con.commit()
    finally:
        con.close()
    return path


def execute_sql(db: Path, sql: str) -> list[tuple]:
    """Run ``sql`` on the database ``db`` opened read-only and return all rows.

    Read-only (``mode=ro``) so that model-generated SQL can never change the database.
    """
    db = Path(db)
    if not db.is_file():  # mode=ro would fail with a vaguer "unable to open database file"
        raise FileNotFoundError(f"no SQLite database at {db}; create one with create_database()")
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()
