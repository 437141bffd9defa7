"""A small Text-to-SQL task: a SQLite schema with seed data and question/SQL pairs.

The data ships as package data (``loraline/data/text2sql``): ``schema.sql`` holds the
CREATE TABLE statements followed by INSERTs of seed rows, and ``pairs.jsonl`` holds
one ``{"question": ..., "sql": ...}`` object per line. Every SQL statement runs on a
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
    "schema_ddl",
]

_DATA = "loraline.data.text2sql"

# Kept short: it is repeated in every prompt, and the demo model is tiny.
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
def _all_examples() -> tuple[Example, ...]:
    rows = [json.loads(line) for line in _read("pairs.jsonl").splitlines() if line.strip()]
    return tuple(Example(question=r["question"], sql=r["sql"]) for r in rows)


def load_examples(split: str = "all") -> list[Example]:
    """Return the question/SQL pairs of ``split``: ``"all"``, ``"train"`` or ``"eval"``.

    The split is deterministic: eval is every 10th pair (index % 10 == 0), train is the rest.
    """
    examples = _all_examples()
    if split == "all":
        return list(examples)
    if split == "eval":
        return [e for i, e in enumerate(examples) if i % 10 == 0]
    if split == "train":
        return [e for i, e in enumerate(examples) if i % 10 != 0]
    raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")


def chat_messages(question: str) -> list[dict[str, str]]:
    """Return the chat for ``question``: a system message with the schema, then the user turn."""
    return [
        {"role": "system", "content": f"{_INSTRUCTION}\n\n{schema_ddl()}"},
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
