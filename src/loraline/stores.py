"""First use of an embedded store (MLflow's SQLite database, Prefect's ephemeral-mode SQLite), once across processes.

Each store migrates its schema the first time something opens it, and neither serializes that across processes:
four ``loraline release`` started at once on a fresh home raced on MLflow's alembic migration ("Online migration
expected to match one row ..."). :func:`init_once` runs a store's first initialization under an exclusive
``fcntl.flock`` on ``<home>/locks/<name>.lock``, then leaves ``<name>.ready`` beside it: later uses see the marker
and take no lock at all (the lock is held only for the first initialization, which the others wait for).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Callable

from loraline.errors import SettingsError

_ready: set[Path] = set()  # markers this process has seen: no stat on every use


def store_key(prefix: str, location: str) -> str:
    """A lock name for one store: ``prefix`` plus a short hash of where it lives (a URI or a path)."""
    return f"{prefix}-{hashlib.sha256(location.encode()).hexdigest()[:16]}"


def init_once(home: Path, name: str, initialize: Callable[[], None], *, exists: Callable[[], bool] = lambda: True) -> bool:
    """Run ``initialize`` if store ``name`` under ``home`` was never initialized; True when this call ran it.

    ``exists`` tells whether the store's data is still there (e.g. its database file): a marker without its store
    (the database was deleted) counts as never initialized. Processes that find the store uninitialized wait on the
    lock, then find the marker the first one left and return without initializing. If ``initialize`` raises, no
    marker is left and the next process tries again.
    """
    locks = Path(home) / "locks"
    marker = locks / f"{name}.ready"
    if marker in _ready and exists():
        return False
    if marker.is_file() and exists():
        _ready.add(marker)
        return False
    try:
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SettingsError(f"cannot create the lock file {locks / (name + '.lock')} ({e}): LORALINE_HOME={home} "
                            "must be a writable directory") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process initializes
        if marker.is_file() and exists():
            _ready.add(marker)
            return False
        initialize()
        marker.write_text("initialized\n")
        _ready.add(marker)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
