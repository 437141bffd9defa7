"""fetch: local dirs, Trainer checkpoints, the Hugging Face Hub (through a cache the test fills, offline) and MLflow URIs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from loraline.digest import digest_dir
from loraline.errors import InvalidAdapter, SourceError
from loraline.settings import Settings
from loraline.sources import adapter_digest, fetch_adapter, fetch_base, parse_source


def test_trainer_checkpoint_keeps_adapter_and_tokenizer_only(demo_assets, settings: Settings) -> None:
    ckpt = demo_assets.checkpoint
    assert (ckpt / "optimizer.pt").is_file()  # what a Trainer writes, and fetch must drop
    a = fetch_adapter(str(ckpt), settings)
    kept = set(a.files)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= kept
    assert not kept & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"}
    assert sorted(p.name for p in a.path.iterdir()) == sorted(kept)
    assert a.path == settings.adapters_dir / a.sha256
    assert a.sha256 == digest_dir(a.path)
    assert a.training_step == 100 and a.training_loss is not None
    assert a.resolved == str(ckpt.resolve())
    # The digest of the kept adapter is what `trace` computes from the original directory.
    assert adapter_digest(ckpt) == a.sha256


def test_fetch_is_content_addressed_and_repeatable(demo_assets, settings: Settings, tmp_path: Path) -> None:
    a1 = fetch_adapter(str(demo_assets.checkpoint), settings)
    moved = tmp_path / "elsewhere"
    shutil.copytree(demo_assets.checkpoint, moved)
    (moved / "optimizer.pt").write_bytes(b"different optimizer state")
    a2 = fetch_adapter(f"file://{moved}", settings)
    assert a2.sha256 == a1.sha256 and a2.path == a1.path


def test_parent_of_checkpoints_names_them(demo_assets, settings: Settings) -> None:
    with pytest.raises(InvalidAdapter, match=r"holds Trainer checkpoints \(checkpoint-100\)"):
        fetch_adapter(str(demo_assets.checkpoint.parent), settings)


@pytest.mark.parametrize(
    "source, message",
    [
        ("", "empty source"),
        ("hf://just-a-name", r"expected hf://ORG/NAME"),
        ("s3:///prefix", r"expected s3://BUCKET/PREFIX"),
        ("ftp://host/x", "unknown scheme"),
        ("/does/not/exist", "does not exist"),
    ],
)
def test_bad_sources_are_named(source: str, message: str, settings: Settings) -> None:
    with pytest.raises(SourceError, match=message):
        fetch_adapter(source, settings)


def _fill_hub_cache(cache: Path, repo: str, src: Path, commit: str, ref: str = "main") -> None:
    """Lay out ``src`` the way huggingface_hub's cache stores a snapshot (blobs + symlinks + refs)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            data = f.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / f.name).symlink_to(Path("../../blobs") / blob.name)


def test_hub_adapter_and_base_pinned_to_commit(demo_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    cache = tmp_path / "hub"
    commit_a, commit_b = "a" * 40, "b" * 40
    _fill_hub_cache(cache, "acme/sql-lora", demo_assets.checkpoint, commit_a)
    _fill_hub_cache(cache, "acme/tiny-base", demo_assets.base, commit_b, ref="v1")
    monkeypatch.setenv("LORALINE_HF_CACHE_DIR", str(cache))
    monkeypatch.setenv("LORALINE_HF_OFFLINE", "true")
    settings = Settings()
    a = fetch_adapter("hf://acme/sql-lora@main", settings)
    assert a.revision == commit_a and a.resolved == f"hf://acme/sql-lora@{commit_a}"
    assert a.sha256 == fetch_adapter(str(demo_assets.checkpoint), settings).sha256
    assert "optimizer.pt" not in a.files and a.training_step == 100
    b = fetch_base("hf://acme/tiny-base@v1", settings)
    assert b.revision == commit_b and b.name == "acme/tiny-base"
    assert b.sha256 == digest_dir(demo_assets.base)
    with pytest.raises(SourceError, match="not in the local Hub cache"):
        fetch_adapter("hf://acme/sql-lora@nope", settings)


def test_mlflow_artifact_uri(demo_assets, settings: Settings) -> None:
    import mlflow

    from loraline.tracking import connect

    client = connect(settings).client
    exp = client.create_experiment("training", artifact_location=(settings.artifact_root / "training").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(demo_assets.checkpoint), "checkpoint")
    client.set_terminated(run.info.run_id)
    a = fetch_adapter(f"runs:/{run.info.run_id}/checkpoint", settings)
    assert a.sha256 == fetch_adapter(str(demo_assets.checkpoint), settings).sha256
    assert a.resolved == f"runs:/{run.info.run_id}/checkpoint"
    with pytest.raises(SourceError, match="MLflow source"):
        fetch_adapter("runs:/0123456789abcdef/none", settings)
    assert mlflow.get_tracking_uri() == settings.resolved_tracking_uri


def test_symlink_out_of_adapter_dir_is_refused(adapter_copy: Path, tmp_path: Path, settings: Settings) -> None:
    outside = tmp_path / "secret.json"
    outside.write_text('{"token": "x"}')
    (adapter_copy / "tokenizer_config.json").unlink()
    (adapter_copy / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(InvalidAdapter, match="symlink .* outside the adapter directory"):
        fetch_adapter(str(adapter_copy), settings)


def test_parse_source_kinds() -> None:
    assert parse_source("hf:org/name").revision == "main"
    assert parse_source("hf://org/name@v2").kind == "hf"
    assert parse_source("models:/x/1").kind == "mlflow"
    assert parse_source("mlflow-artifacts:/1/abc/artifacts/a").kind == "mlflow"
    assert parse_source("relative/dir").kind == "local"
