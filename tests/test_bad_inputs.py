"""The bad-input corpus: each case is something a user can hand loraline, and the exact message it must give.

Every adapter case goes through what a release runs first (fetch -> validate): a refusal there happens before any
merge or MLflow write (tests/test_release.py checks, through the flow, that a refused release leaves no version,
alias or run). The other cases name the setting, reference or name that is wrong.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraline.errors import InvalidAdapter, LoralineError, SettingsError, SourceError, TraceError
from loraline.settings import Settings
from loraline.sources import fetch_adapter, fetch_base
from loraline.validation import validate_adapter


@dataclass
class Ctx:
    demo: Any
    settings: Settings
    tmp: Path

    def copy(self, name: str = "adapter") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.demo.checkpoint, dst)
        return dst

    def release_steps(self, adapter: Path | str, base: Path | str | None = None, **settings: Any) -> Any:
        s = self.settings.model_copy(update=settings) if settings else self.settings
        return validate_adapter(fetch_adapter(str(adapter), s), fetch_base(str(base or self.demo.base), s), s)


def _config(d: Path, **changes: Any) -> Path:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def _tensors(d: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    f = d / "adapter_model.safetensors"
    t = load_file(str(f))
    change(t)
    save_file(t, str(f), metadata={"format": "pt"})
    return d


class Boom:
    """A pickle whose loading runs a command: it must never be loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _first(t: dict[str, torch.Tensor], kind: str = "lora_A") -> str:
    return next(k for k in sorted(t) if kind in k)


# --------------------------------------------------------------------------- adapter cases: (build, error, message)


def pickle_only(c: Ctx):
    d = c.copy()
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"w": Boom(c.tmp / "PWNED")}))
    return lambda: c.release_steps(d), InvalidAdapter, "adapter_model.bin: pickled weights are refused and were not loaded"


def corrupt_header(c: Ctx):
    d = c.copy()
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])  # the JSON header garbled, its length kept
    return lambda: c.release_steps(d), InvalidAdapter, "adapter_model.safetensors: not a readable safetensors file"


def oversized_header(c: Ctx):
    d = c.copy()
    f = d / "adapter_model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**40) + f.read_bytes()[8:])  # claims a 1 TiB header
    return lambda: c.release_steps(d), InvalidAdapter, "adapter_model.safetensors: not a readable safetensors file"


def truncated_weights(c: Ctx):
    d = c.copy()
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return lambda: c.release_steps(d), InvalidAdapter, "adapter_model.safetensors: not a readable safetensors file"


def truncated_config(c: Ctx):
    d = c.copy()
    (d / "adapter_config.json").write_text((d / "adapter_config.json").read_text()[:40])
    return lambda: c.release_steps(d), InvalidAdapter, "adapter_config.json: not valid JSON"


def config_not_an_object(c: Ctx):
    d = c.copy()
    (d / "adapter_config.json").write_text("[1, 2]")
    return lambda: c.release_steps(d), InvalidAdapter, "adapter_config.json: expected a JSON object, got list"


def nan_weights(c: Ctx):
    d = _tensors(c.copy(), lambda t: t[_first(t)].view(-1).__setitem__(0, float("nan")))
    return lambda: c.release_steps(d), InvalidAdapter, "NaN/Inf value(s); the training run diverged"


def inf_weights(c: Ctx):
    d = _tensors(c.copy(), lambda t: t[_first(t, "lora_B")].view(-1).__setitem__(0, float("inf")))
    return lambda: c.release_steps(d), InvalidAdapter, "NaN/Inf value(s); the training run diverged"


def other_base_shapes(c: Ctx):
    from loraline.tiny_models import build_llama, build_lora

    other = build_llama(c.tmp / "other-base", vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=1, intermediate_size=512)
    d = build_lora(other, c.tmp / "other-adapter", r=8, target_modules=["q_proj"])
    return lambda: c.release_steps(d), InvalidAdapter, "this adapter was trained for a different base"


def other_base_revision(c: Ctx):
    from dataclasses import replace

    d = _config(c.copy(), base_model_name_or_path="HuggingFaceTB/SmolLM2-360M", revision="a" * 40)

    def run():
        s = c.settings
        base = replace(fetch_base(str(c.demo.base), s), name="HuggingFaceTB/SmolLM2-360M", revision="b" * 40,
                       resolved="hf://HuggingFaceTB/SmolLM2-360M@" + "b" * 40)
        return validate_adapter(fetch_adapter(str(d), s), base, s)

    return run, InvalidAdapter, f"trained on revision {'a' * 40} but the base resolved to {'b' * 40}"


def target_missing(c: Ctx):
    d = _config(c.copy(), target_modules=["q_proj", "not_a_module"])
    return lambda: c.release_steps(d), InvalidAdapter, "target module(s) 'not_a_module' do not exist in the base"


def rank_zero(c: Ctx):
    d = _config(c.copy(), r=0)
    return lambda: c.release_steps(d), InvalidAdapter, "rank r=0 is not a positive integer"


def rank_above_setting(c: Ctx):
    d = _config(c.copy(), r=128)
    return lambda: c.release_steps(d), InvalidAdapter, "rank 128 is above max_lora_rank=64; raise LORALINE_MAX_LORA_RANK to 128"


def rank_above_vllm(c: Ctx):
    d = _config(c.copy(), r=1024)
    return lambda: c.release_steps(d), InvalidAdapter, "rank 1024 is above 512, the largest rank vLLM serves"


def rank_not_in_vllm_set(c: Ctx):
    def run():
        Settings(max_lora_rank=48)

    return run, Exception, "LORALINE_MAX_LORA_RANK=48 is not a value vLLM accepts for --max-lora-rank"


def not_lora(c: Ctx):
    d = _config(c.copy(), peft_type="IA3")
    return lambda: c.release_steps(d), InvalidAdapter, "peft_type is 'IA3'; loraline releases LoRA adapters only"


def remote_code_base(c: Ctx):
    base = c.tmp / "remote-base"
    shutil.copytree(c.demo.base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(cfg))
    return lambda: c.release_steps(c.demo.checkpoint, base), InvalidAdapter, "config.json has auto_map, so loading it runs code from the model repo"


def pickle_only_base(c: Ctx):
    base = c.tmp / "pickle-base"
    shutil.copytree(c.demo.base, base)
    for f in base.glob("*.safetensors"):
        f.unlink()
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(Boom(c.tmp / "PWNED")))
    return lambda: c.release_steps(c.demo.checkpoint, base), InvalidAdapter, "no *.safetensors weights (it has pytorch_model.bin: pickles are never loaded)"


def no_tokenizer(c: Ctx):
    base = c.tmp / "bare-base"
    shutil.copytree(c.demo.base, base)
    d = c.copy()
    for root in (base, d):
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (root / f).unlink(missing_ok=True)
    return lambda: c.release_steps(d, base), InvalidAdapter, "no tokenizer (tokenizer.json / tokenizer_config.json); the served model needs one"


def missing_weights(c: Ctx):
    d = c.copy()
    (d / "adapter_model.safetensors").unlink()
    return lambda: c.release_steps(d), InvalidAdapter, "adapter_model.safetensors: missing; the adapter has no weights"


def empty_dir(c: Ctx):
    d = c.tmp / "empty"
    d.mkdir()
    return lambda: c.release_steps(d), InvalidAdapter, "missing adapter_config.json; point --adapter at the directory"


def symlink_outside(c: Ctx):
    d = c.copy()
    outside = c.tmp / "elsewhere.safetensors"
    shutil.move(d / "adapter_model.safetensors", outside)
    (d / "adapter_model.safetensors").symlink_to(outside)
    return lambda: c.release_steps(d), InvalidAdapter, f"adapter_model.safetensors is a symlink to {outside}, outside the adapter directory"


def _tar(c: Ctx, name: str, extra: Callable[[tarfile.TarFile], None]) -> Path:
    path = c.tmp / name
    with tarfile.open(path, "w:gz") as t:
        for f in sorted(c.demo.checkpoint.iterdir()):
            if f.is_file():
                t.add(f, arcname=f"checkpoint-100/{f.name}")
        extra(t)
    return path


def archive_traversal(c: Ctx):
    def evil(t: tarfile.TarFile) -> None:
        data = b"owned"
        info = tarfile.TarInfo("../../evil.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))

    path = _tar(c, "traversal.tar.gz", evil)
    return lambda: c.release_steps(path), InvalidAdapter, "archive member '../../evil.txt' is an absolute path or climbs out with '..'"


def archive_absolute(c: Ctx):
    path = c.tmp / "absolute.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("/etc/cron.d/evil", "* * * * * root true\n")
        for f in sorted(c.demo.checkpoint.iterdir()):
            if f.is_file():
                z.write(f, f"checkpoint-100/{f.name}")
    return lambda: c.release_steps(path), InvalidAdapter, "archive member '/etc/cron.d/evil' is an absolute path"


def archive_symlink(c: Ctx):
    def link(t: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("checkpoint-100/tokenizer.model")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/shadow"
        t.addfile(info)

    path = _tar(c, "symlink.tar.gz", link)
    return lambda: c.release_steps(path), InvalidAdapter, "archive member 'checkpoint-100/tokenizer.model' is a link; nothing was extracted"


def other_base_name(c: Ctx):
    from dataclasses import replace

    d = _config(c.copy(), base_model_name_or_path="HuggingFaceTB/SmolLM2-1.7B")

    def run():
        base = replace(fetch_base(str(c.demo.base), c.settings), name="HuggingFaceTB/SmolLM2-360M")
        return validate_adapter(fetch_adapter(str(d), c.settings), base, c.settings)

    return run, InvalidAdapter, "trained on 'HuggingFaceTB/SmolLM2-1.7B' but the base given is 'HuggingFaceTB/SmolLM2-360M'; pass --base hf://HuggingFaceTB/SmolLM2-1.7B"


# Accepted for a merged release, but not servable as vLLM runtime LoRA: the report says so (NOTED instead of an error),
# runtime_lora_servable is false, and `--image lora` is then refused before anything is merged (lora_image_of_dora).
NOTED = None


def dora(c: Ctx):
    return lambda: c.release_steps(_config(c.copy(), use_dora=True)), NOTED, "DoRA (use_dora=true): vLLM runtime LoRA does not serve DoRA; serve the merged model"


def modules_to_save(c: Ctx):
    return (lambda: c.release_steps(_config(c.copy(), modules_to_save=["lm_head"])), NOTED,
            "modules_to_save=['lm_head']: vLLM runtime LoRA cannot load full modules; serve the merged model")


def resized_embeddings(c: Ctx):
    base = load_file(str(next(c.demo.base.glob("*.safetensors"))))
    emb = next(k for k in base if k.endswith("embed_tokens.weight"))
    grown = torch.cat([base[emb], torch.zeros(8, base[emb].shape[1], dtype=base[emb].dtype)])  # 8 new tokens

    def add(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model." + emb] = grown

    d = _tensors(c.copy(), add)
    return (lambda: c.release_steps(d), NOTED,
            f"resized embeddings in the adapter (base_model.model.{emb}): vLLM runtime LoRA cannot load them; serve the merged model")


def lora_image_of_dora(c: Ctx):
    from loraline.errors import ImageError
    from loraline.image import preflight

    d = _config(c.copy(), use_dora=True)
    return (lambda: preflight(c.settings, "lora", c.release_steps(d).runtime_lora_servable), ImageError,
            "--image lora: vLLM cannot serve this adapter as runtime LoRA (see the validation notes); use --image merged")


def no_chat_template(c: Ctx):
    base = c.tmp / "plain-base"
    shutil.copytree(c.demo.base, base)
    d = c.copy()
    for x in (base, d):
        (x / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((x / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (x / "tokenizer_config.json").write_text(json.dumps(cfg))
    return lambda: c.release_steps(d, base), NOTED, "no chat template"


def hub_link_outside(c: Ctx):
    # A Hub cache snapshot (offline, pinned to a commit) whose weights file links outside the repo's blobs.
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = c.tmp / "hub" / "models--acme--smol-lora" / "snapshots" / sha
    shutil.copytree(c.demo.checkpoint, snap)
    outside = c.tmp / "outside.safetensors"
    (snap / "adapter_model.safetensors").rename(outside)
    (snap / "adapter_model.safetensors").symlink_to(outside)
    return (lambda: c.release_steps(f"hf://acme/smol-lora@{sha}", hf_cache_dir=c.tmp / "hub", hf_offline=True),
            InvalidAdapter, f"adapter_model.safetensors is a symlink to {outside}, outside the adapter directory")


def mlflow_artifact_traversal(c: Ctx):
    return (lambda: c.release_steps("runs:/0123456789abcdef0123456789abcdef/../../../etc"), SourceError,
            "MLflow source 'runs:/0123456789abcdef0123456789abcdef/../../../etc': '..' climbs out of the run's artifacts")


def s3_prefix_traversal(c: Ctx):
    return (lambda: c.release_steps("s3://bucket/adapters/../../etc"), SourceError,
            "S3 source 's3://bucket/adapters/../../etc': prefix 'adapters/../../etc' is an absolute path or climbs out")


def missing_path(c: Ctx):
    return lambda: c.release_steps(c.tmp / "nope"), SourceError, f"{c.tmp / 'nope'} does not exist; check the path"


# --------------------------------------------------------------------------- names, references, settings


def invalid_model_name(c: Ctx):
    from loraline.registry import check_model_name

    return lambda: check_model_name("smol sql/../x"), SettingsError, "model name 'smol sql/../x' is not allowed"


def unknown_alias(c: Ctx):
    from loraline.trace import trace

    return lambda: trace("models:/smol-sql@nope", c.settings), TraceError, "cannot trace 'models:/smol-sql@nope'"


def wrong_mlflow_uri(c: Ctx):
    from loraline.trace import trace

    s = c.settings.model_copy(update={"tracking_uri": "postgresq://db/mlflow"})
    return lambda: trace("models:/smol-sql/1", s), SettingsError, "LORALINE_TRACKING_URI 'postgresq://db/mlflow': MLflow does not know the scheme 'postgresq'"


def registry_with_credentials(c: Ctx):
    from loraline.oci import check_registry

    s = c.settings.model_copy(update={"image_registry": "bob:hunter2@registry.example.com"})
    return lambda: check_registry(s), LoralineError, "credentials; log in with `docker login HOST` instead"


CASES = {f.__name__: f for f in [
    pickle_only, corrupt_header, oversized_header, truncated_weights, truncated_config, config_not_an_object,
    nan_weights, inf_weights, other_base_shapes, other_base_revision, target_missing, rank_zero, rank_above_setting,
    rank_above_vllm, rank_not_in_vllm_set, not_lora, remote_code_base, pickle_only_base, no_tokenizer,
    missing_weights, empty_dir, symlink_outside, archive_traversal, archive_absolute, archive_symlink, hub_link_outside,
    mlflow_artifact_traversal, other_base_name, dora, modules_to_save, resized_embeddings, no_chat_template,
    lora_image_of_dora,
    s3_prefix_traversal, missing_path, invalid_model_name, unknown_alias, wrong_mlflow_uri, registry_with_credentials,
]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_with_its_message(case: str, demo_assets, settings: Settings, tmp_path: Path) -> None:
    run, error, message = CASES[case](Ctx(demo_assets, settings, tmp_path))
    if error is NOTED:
        report = run()
        assert any(message in n for n in report.notes), report.notes
        if case != "no_chat_template":  # a warning only: vLLM serves it with the tokenizer's default
            assert report.runtime_lora_servable is False
    else:
        with pytest.raises(error) as e:
            run()
        assert message in str(e.value), str(e.value)
        assert "hunter2" not in str(e.value)  # a credential in the input is never echoed back
    # Nothing ran that should not: no pickle payload executed, nothing written outside the archive's extraction dir.
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_the_corpus_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25


def test_a_good_archive_is_released_like_its_directory(demo_assets, settings: Settings, tmp_path: Path) -> None:
    c = Ctx(demo_assets, settings, tmp_path)
    path = _tar(c, "good.tar.gz", lambda t: None)
    from_archive = fetch_adapter(str(path), settings)
    from_dir = fetch_adapter(str(demo_assets.checkpoint), settings)
    assert from_archive.sha256 == from_dir.sha256 and from_archive.resolved == str(path)
    assert validate_adapter(from_archive, fetch_base(str(demo_assets.base), settings), settings).runtime_lora_servable
