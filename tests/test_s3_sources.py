"""s3://BUCKET/PREFIX as an adapter and a base source, against the real object store of `loraline services`
(SeaweedFS, signatures checked): the same adapter digest as the local directory, pinned by each object's ETag and
VersionId, downloaded once; wrong keys, a missing bucket, an empty prefix and pickle weights refused before anything
is merged, each naming the URI and the setting to fix."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from helpers import teardown_later
from loraline.demo import DemoAssets
from loraline.digest import digest_dir
from loraline.errors import InvalidAdapter, SourceError
from loraline.services.object_store import ObjectStore, start_object_store, stop_object_store
from loraline.settings import Settings
from loraline.sources import _safe_key, fetch_adapter, fetch_base, parse_source

VERSIONED = "versioned"


def _upload(client, bucket: str, prefix: str, src: Path) -> dict[str, dict]:
    """Every file under ``src`` as ``prefix/<relative path>``; the PUT responses (ETag, VersionId) by key."""
    keys = {f"{prefix}/{p.relative_to(src).as_posix()}": p for p in sorted(src.rglob("*")) if p.is_file()}
    return {k: client.put_object(Bucket=bucket, Key=k, Body=p.read_bytes()) for k, p in keys.items()}


@pytest.fixture(scope="module")
def store(demo_assets: DemoAssets, tmp_path_factory: pytest.TempPathFactory):
    """The object store in its own home, holding the demo checkpoint and base (and a versioned bucket with the checkpoint)."""
    s = Settings(home=tmp_path_factory.mktemp("s3-store"))
    try:
        st = start_object_store(s)
        c = st.client()
        puts = _upload(c, st.bucket, "adapters/ckpt", demo_assets.checkpoint)
        _upload(c, st.bucket, "bases/tiny", demo_assets.base)
        c.create_bucket(Bucket=VERSIONED)
        c.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
        versioned = _upload(c, VERSIONED, "ckpt", demo_assets.checkpoint)
        yield st, puts, versioned
    finally:
        teardown_later("the s3 sources' object store", lambda: stop_object_store(s))  # 17 s of graceful waits


@pytest.fixture()
def s3(store, home: Path, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """This test's home, with the store's endpoint and keys in LORALINE_S3_* (and nothing of boto3's own chain)."""
    st = store[0]
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home.parent / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home.parent / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups for credentials
    access, secret = st.keys()
    monkeypatch.setenv("LORALINE_S3_ENDPOINT_URL", st.endpoint)
    monkeypatch.setenv("LORALINE_S3_ACCESS_KEY_ID", access)
    monkeypatch.setenv("LORALINE_S3_SECRET_ACCESS_KEY", secret)
    return st


def _sent(st: ObjectStore) -> int:
    """Bytes the S3 gateway process has written so far (to its clients, the filer, its log): what a download costs it."""
    pid = (st.credentials_file.parent / "gateway" / "pid").read_text().strip()
    return int(next(ln.split()[1] for ln in Path(f"/proc/{pid}/io").read_text().splitlines() if ln.startswith("wchar:")))


def _files(d: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under ``d``: unchanged when nothing was downloaded again."""
    return {p.relative_to(d).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def test_s3_checkpoint_is_the_local_adapter_pinned_by_etags_and_downloaded_once(s3, store, demo_assets: DemoAssets) -> None:
    puts = store[1]
    settings = Settings()
    local = fetch_adapter(str(demo_assets.checkpoint), settings)
    weights = (demo_assets.checkpoint / "adapter_model.safetensors").stat().st_size
    sent = _sent(s3)
    a = fetch_adapter("s3://loraline/adapters/ckpt", settings)
    assert _sent(s3) - sent > weights  # downloaded
    assert a.sha256 == local.sha256 and a.files == local.files and a.path == local.path
    assert a.training_step == 100 and a.training_loss == local.training_loss  # from the uploaded trainer_state.json
    assert a.resolved == "s3://loraline/adapters/ckpt" and a.revision == a.s3.pin
    assert a.s3.endpoint == s3.endpoint and (a.s3.bucket, a.s3.prefix) == ("loraline", "adapters/ckpt")
    # Only the adapter and tokenizer files (and the trainer state) were downloaded: no optimizer state, no pickles.
    keys = {o.key.removeprefix("adapters/ckpt/") for o in a.s3.objects}
    assert keys == set(local.files) | {"trainer_state.json"}
    assert {o.key: o.etag for o in a.s3.objects} == {k: puts[k]["ETag"].strip('"') for k in (o.key for o in a.s3.objects)}
    assert all(o.version_id is None for o in a.s3.objects)  # no versioning on this bucket
    snapshot = settings.s3_cache_dir / a.s3.pin
    assert sorted(_files(snapshot)) == sorted(keys)

    # Fetched again, unchanged: the same pin, nothing downloaded again (a trailing slash names the same prefix).
    before, sent = _files(snapshot), _sent(s3)
    again = fetch_adapter("s3://loraline/adapters/ckpt/", settings)
    assert _sent(s3) - sent < weights / 4, (_sent(s3) - sent, weights)  # listed and HEADed only
    assert (again.sha256, again.revision) == (a.sha256, a.revision) and _files(snapshot) == before
    assert [p.name for p in settings.s3_cache_dir.iterdir()] == [a.s3.pin]  # no stage left behind

    # An object rewritten with other bytes: a new ETag, a new pin, a new adapter digest.
    c = s3.client()
    c.put_object(Bucket="loraline", Key="adapters/ckpt2/adapter_config.json",
                 Body=(demo_assets.checkpoint / "adapter_config.json").read_bytes())
    c.put_object(Bucket="loraline", Key="adapters/ckpt2/adapter_model.safetensors",
                 Body=(demo_assets.checkpoint / "adapter_model.safetensors").read_bytes())
    b1 = fetch_adapter("s3://loraline/adapters/ckpt2", settings)
    cfg = (demo_assets.checkpoint / "adapter_config.json").read_text().replace('"lora_alpha": ', '"lora_alpha":  ')
    assert cfg != (demo_assets.checkpoint / "adapter_config.json").read_text()
    c.put_object(Bucket="loraline", Key="adapters/ckpt2/adapter_config.json", Body=cfg.encode())
    b2 = fetch_adapter("s3://loraline/adapters/ckpt2", settings)
    assert b2.revision != b1.revision and b2.sha256 != b1.sha256
    assert (b2.path / "adapter_config.json").read_text() == cfg


def test_versioned_bucket_pins_each_object_version(s3, store, demo_assets: DemoAssets) -> None:
    versioned = store[2]
    settings = Settings()
    a = fetch_adapter(f"s3://{VERSIONED}/ckpt", settings)
    assert a.sha256 == fetch_adapter(str(demo_assets.checkpoint), settings).sha256
    assert {o.key: o.version_id for o in a.s3.objects} == {o.key: versioned[o.key]["VersionId"] for o in a.s3.objects}
    assert all(o.version_id for o in a.s3.objects)
    # The same bytes uploaded again are a new version: a new pin, the same adapter.
    key = "ckpt/tokenizer_config.json"
    s3.client().put_object(Bucket=VERSIONED, Key=key, Body=(demo_assets.checkpoint / "tokenizer_config.json").read_bytes())
    b = fetch_adapter(f"s3://{VERSIONED}/ckpt", settings)
    assert b.revision != a.revision and b.sha256 == a.sha256
    assert next(o for o in b.s3.objects if o.key == key).version_id != versioned[key]["VersionId"]


def test_s3_base_is_the_local_base(s3, demo_assets: DemoAssets) -> None:
    settings = Settings()
    b = fetch_base("s3://loraline/bases/tiny", settings)
    assert b.sha256 == digest_dir(demo_assets.base) == fetch_base(str(demo_assets.base), settings).sha256
    assert b.path == settings.s3_cache_dir / b.s3.pin and b.resolved == "s3://loraline/bases/tiny" and b.revision == b.s3.pin
    assert fetch_base(b.resolved, settings).path == b.path  # what the benchmark does later: the same pin, no download
    # One .gguf object goes the way of a local .gguf file (here: refused as not a GGUF file, after the download).
    s3.client().put_object(Bucket="loraline", Key="bases/broken.gguf", Body=b"not a gguf file at all" * 10)
    with pytest.raises(SourceError, match=r"base source 's3://loraline/bases/broken\.gguf'"):
        fetch_base("s3://loraline/bases/broken.gguf", settings)
    with pytest.raises(SourceError, match=r"'s3://loraline/bases/none\.gguf'.*holds no object 'bases/none\.gguf'"):
        fetch_base("s3://loraline/bases/none.gguf", settings)
    with pytest.raises(SourceError, match=r"no config\.json under s3://loraline/adapters/ckpt/"):
        fetch_base("s3://loraline/adapters/ckpt", settings)


def test_wrong_keys_missing_bucket_and_no_endpoint_are_named(s3, demo_assets: DemoAssets, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraline.server import free_port

    wrong = "W" * 40
    monkeypatch.setenv("LORALINE_S3_SECRET_ACCESS_KEY", wrong)
    settings = Settings()
    with pytest.raises(SourceError) as e:
        fetch_adapter("s3://loraline/adapters/ckpt", settings)
    msg = str(e.value)
    assert "'s3://loraline/adapters/ckpt'" in msg and "SignatureDoesNotMatch" in msg
    assert "LORALINE_S3_ACCESS_KEY_ID / LORALINE_S3_SECRET_ACCESS_KEY" in msg and wrong not in msg
    # Nothing half-written: no download directory, no stage, no kept adapter.
    assert not settings.s3_cache_dir.exists() or not any(settings.s3_cache_dir.iterdir())
    assert not any(settings.adapters_dir.iterdir())

    monkeypatch.setenv("LORALINE_S3_SECRET_ACCESS_KEY", s3.keys()[1])
    with pytest.raises(SourceError, match=r"'s3://nope/adapters/ckpt': bucket 'nope' does not exist at http://127\.0\.0\.1"):
        fetch_adapter("s3://nope/adapters/ckpt", Settings())
    monkeypatch.delenv("LORALINE_S3_SECRET_ACCESS_KEY")
    with pytest.raises(SourceError, match="set both LORALINE_S3_ACCESS_KEY_ID and LORALINE_S3_SECRET_ACCESS_KEY"):
        fetch_adapter("s3://loraline/adapters/ckpt", Settings())
    monkeypatch.delenv("LORALINE_S3_ACCESS_KEY_ID")
    with pytest.raises(SourceError, match="no S3 credentials; set LORALINE_S3_ACCESS_KEY_ID"):
        fetch_adapter("s3://loraline/adapters/ckpt", Settings())
    monkeypatch.setenv("LORALINE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")  # boto3's own chain, when LORALINE_S3_* are unset
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x" * 40)
    with pytest.raises(SourceError, match="cannot reach the S3 endpoint http://127.0.0.1:.*check LORALINE_S3_ENDPOINT_URL"):
        fetch_adapter("s3://loraline/adapters/ckpt", Settings())


def test_empty_prefix_pickles_and_no_adapter_are_refused_before_download(s3, demo_assets: DemoAssets) -> None:
    settings = Settings()
    c = s3.client()
    with pytest.raises(SourceError, match=r"'s3://loraline/adapters/none'.*holds no objects under 'adapters/none/'"):
        fetch_adapter("s3://loraline/adapters/none", settings)
    # adapters/ck is no folder: "adapters/ckpt" only starts with it.
    with pytest.raises(SourceError, match="holds no objects under 'adapters/ck/'"):
        fetch_adapter("s3://loraline/adapters/ck", settings)
    # Pickled weights only: refused by name, never downloaded.
    c.put_object(Bucket="loraline", Key="adapters/pickled/adapter_config.json",
                 Body=(demo_assets.checkpoint / "adapter_config.json").read_bytes())
    c.put_object(Bucket="loraline", Key="adapters/pickled/adapter_model.bin", Body=pickle.dumps({"w": [0.0] * 8}))
    with pytest.raises(InvalidAdapter, match=r"'s3://loraline/adapters/pickled'.*adapter_model\.bin holds pickled weights"):
        fetch_adapter("s3://loraline/adapters/pickled", settings)
    c.put_object(Bucket="loraline", Key="adapters/noconfig/tokenizer.json", Body=b"{}")
    with pytest.raises(InvalidAdapter, match=r"'s3://loraline/adapters/noconfig': no adapter_config\.json under "
                                              r"s3://loraline/adapters/noconfig/ \(it holds tokenizer\.json\)"):
        fetch_adapter("s3://loraline/adapters/noconfig", settings)
    assert not settings.s3_cache_dir.exists() or not any(settings.s3_cache_dir.iterdir())
    # A prefix over Trainer checkpoints: which one to release is the user's call, named as an s3:// URI.
    _upload(c, "loraline", "runs/r1/checkpoint-100", demo_assets.checkpoint)
    with pytest.raises(InvalidAdapter, match=r"holds Trainer checkpoints \(checkpoint-100\).*s3://loraline/runs/r1/checkpoint-100"):
        fetch_adapter("s3://loraline/runs/r1", settings)


def test_keys_that_climb_out_are_refused() -> None:
    # SeaweedFS itself refuses such keys (InvalidRequest); other stores may not.
    for bad in ("s3://loraline/a/../../etc", "s3://loraline/./x"):
        with pytest.raises(SourceError, match="climbs out"):
            parse_source(bad)
    for key in ("../adapter_config.json", "/etc/passwd", "a/../../b", "C:/x", "..\\..\\x"):
        with pytest.raises(SourceError, match="absolute path or climbs out"):
            _safe_key(key, "s3://b/p")
    assert _safe_key("checkpoint-100/adapter_config.json", "s3://b/p") == "checkpoint-100/adapter_config.json"
    for bad in ("s3://", "s3:///x", "s3://a b/x"):
        with pytest.raises(SourceError, match="expected s3://BUCKET/PREFIX"):
            parse_source(bad)
    assert parse_source("s3://loraline/adapters/ckpt/").location == "loraline/adapters/ckpt"
    assert parse_source("s3://loraline").location == "loraline/"


def test_release_from_s3_with_the_secret_in_a_prefect_block(prefect_harness, s3, store, demo_assets: DemoAssets,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The release flow on the s3:// checkpoint and base, the secret key from the Prefect Secret block
    `loraline-s3-secret-key`: the version records each object's ETag, and the secret is nowhere in MLflow."""
    import json

    from mlflow import MlflowClient
    from prefect.blocks.system import Secret

    from loraline_flows.release import release

    secret = s3.keys()[1]
    monkeypatch.delenv("LORALINE_S3_SECRET_ACCESS_KEY")
    monkeypatch.setenv("LORALINE_IMAGE", "none")
    monkeypatch.setenv("LORALINE_EVAL", "false")
    Secret(value=secret).save("loraline-s3-secret-key", overwrite=True)
    try:
        out = release(adapter="s3://loraline/adapters/ckpt", base="s3://loraline/bases/tiny", name="s3-sql")
    finally:
        Secret.delete("loraline-s3-secret-key")
    settings = Settings()
    assert out["adapter"]["sha256"] == fetch_adapter(str(demo_assets.checkpoint), settings).sha256
    assert out["base"]["sha256"] == digest_dir(demo_assets.base) and out["base"]["resolved"] == "s3://loraline/bases/tiny"
    etags = {o["key"]: o["etag"] for o in out["adapter"]["s3"]["objects"]}
    assert etags["adapters/ckpt/adapter_model.safetensors"] == store[1]["adapters/ckpt/adapter_model.safetensors"]["ETag"].strip('"')
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    mv = client.get_model_version("s3-sql", out["model_version"])
    assert mv.tags["loraline.adapter.source"] == "s3://loraline/adapters/ckpt"
    assert mv.tags["loraline.adapter.revision"] == out["adapter"]["revision"] == out["adapter"]["s3"]["pin"]
    assert f"adapters/ckpt/adapter_model.safetensors {etags['adapters/ckpt/adapter_model.safetensors']}" in mv.tags["loraline.adapter.s3.objects"]
    assert mv.tags["loraline.base.s3.endpoint"] == s3.endpoint
    run = client.get_run(out["mlflow_run_id"])
    lineage = Path(client.download_artifacts(run.info.run_id, "lineage.json")).read_text()
    assert json.loads(lineage)["adapter"]["s3"]["objects"] == out["adapter"]["s3"]["objects"]
    recorded = json.dumps([mv.tags, run.data.tags, run.data.params, lineage, mv.description])
    assert secret not in recorded
