"""What the benchmark scripts share (they run as files: ``python benchmarks/NAME.py``, so this directory is on
``sys.path`` and ``from _common import …`` finds this module)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """The checkout's commit, or "unknown" outside a git checkout; results record it."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
