"""The directory digest is the one anyone can recompute with coreutils."""

from __future__ import annotations

from pathlib import Path

from helpers import coreutils_digest
from loraline.digest import digest_dir

def test_digest_matches_coreutils_recipe(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zz")
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "B.bin").write_bytes(bytes(range(256)))  # uppercase sorts first under LC_ALL=C
    (tmp_path / "name with space.txt").write_text("s")
    assert digest_dir(tmp_path) == coreutils_digest(tmp_path)


def test_digest_changes_with_content_and_name(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("1")
    d1 = digest_dir(tmp_path)
    (tmp_path / "f").write_text("2")
    d2 = digest_dir(tmp_path)
    (tmp_path / "f").rename(tmp_path / "g")
    d3 = digest_dir(tmp_path)
    assert len({d1, d2, d3}) == 3


def test_digest_follows_symlinks_like_find_L(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "x").write_text("payload")
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "file.txt").symlink_to(blobs / "x")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file.txt").write_text("payload")
    assert digest_dir(snap) == digest_dir(plain) == coreutils_digest(snap)


def test_demo_model_digest_matches_coreutils(demo_assets) -> None:
    assert digest_dir(demo_assets.base) == coreutils_digest(demo_assets.base)
