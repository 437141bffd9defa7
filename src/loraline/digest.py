"""Directory digests: the lineage key of adapters, bases and merged models.

The digest of a directory is the sha256 of its ``sha256sum``-style listing: one line
``<sha256 hex of file>  <relative POSIX path>\\n`` per regular file, sorted by path
(bytewise, as ``LC_ALL=C sort``), encoded as UTF-8. Anyone can recompute it with coreutils::

    cd DIR && find -L . -type f | sed 's|^./||' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum

(``-L`` follows symlinks, as in a Hugging Face cache snapshot; without symlinks it is the
same as plain ``find``.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``root`` (symlinks followed), C-sorted."""
    root = Path(root)
    out: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file():
                out.append(full.relative_to(root).as_posix())
    out.sort(key=lambda p: p.encode("utf-8"))
    return out


def manifest(root: Path, known: Mapping[str, str] | None = None) -> str:
    """The ``sha256sum`` listing of ``root`` that the digest hashes. ``known``: sha256s of files (relative paths) the
    caller hashed as it wrote them, not read again."""
    root = Path(root)
    known = known or {}
    return "".join(f"{known.get(rel) or sha256_file(root / rel)}  {rel}\n" for rel in list_files(root))


def digest_dir(root: Path, known: Mapping[str, str] | None = None) -> str:
    """Hex sha256 of :func:`manifest` — recomputable with coreutils (module docstring). ``known``: as for manifest."""
    root = Path(root)
    if not root.is_dir():
        from loraline.errors import SourceError

        raise SourceError(f"cannot digest {root}: not a directory; give the directory that holds the model or adapter files")
    return hashlib.sha256(manifest(root, known).encode("utf-8")).hexdigest()


def dir_bytes(root: Path) -> int:
    """Total size in bytes of the regular files under ``root``."""
    root = Path(root)
    return sum((root / rel).stat().st_size for rel in list_files(root))
