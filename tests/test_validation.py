"""validate: every bad adapter is refused before any weights are merged, with the file and the fix in the message."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loraline.tiny_models import build_llama, build_lora
from loraline.errors import InvalidAdapter
from loraline.settings import Settings
from loraline.sources import fetch_adapter, fetch_base
from loraline.validation import validate_adapter


def check(adapter: Path, base: Path, settings: Settings):
    return validate_adapter(fetch_adapter(str(adapter), settings), fetch_base(str(base), settings), settings)


def test_demo_checkpoint_is_valid_and_runtime_servable(demo_assets, settings: Settings) -> None:
    report = check(demo_assets.checkpoint, demo_assets.base, settings)
    assert report.peft_type == "LORA" and report.r == 8
    assert report.adapted_modules == 14  # 7 projections x 2 layers
    assert report.runtime_lora_servable and report.notes == ()
    assert report.serving_max_lora_rank == 8


class Payload:
    """A pickle that would create a file if anything ever unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_only_adapter_is_refused_and_never_loaded(adapter_copy: Path, demo_assets, settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    (adapter_copy / "adapter_model.safetensors").unlink()
    (adapter_copy / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(InvalidAdapter, match=r"adapter_model\.bin: pickled weights are refused and were not loaded; convert them to safetensors"):
        check(adapter_copy, demo_assets.base, settings)
    assert not marker.exists()


def test_adapter_for_a_different_base_is_refused(demo_assets, settings: Settings, tmp_path: Path) -> None:
    other = build_llama(tmp_path / "other-base", vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=1, intermediate_size=512)
    adapter = build_lora(other, tmp_path / "other-adapter", r=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(InvalidAdapter, match=r"has shape \[\d+, \d+\] but the base.s model\.layers\.0\.self_attn\.\w+ needs .*trained for a different base"):
        check(adapter, demo_assets.base, settings)


def test_target_module_missing_from_base(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    cfg_path = adapter_copy / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapter, match=r"adapter_config.json: target module\(s\) 'c_attn' do not exist in the base"):
        check(adapter_copy, demo_assets.base, settings)


def test_truncated_adapter_config(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    cfg_path = adapter_copy / "adapter_config.json"
    text = cfg_path.read_text()
    cfg_path.write_text(text[: len(text) // 2])
    with pytest.raises(InvalidAdapter, match=r"adapter_config.json: not valid JSON .* truncated or corrupt"):
        check(adapter_copy, demo_assets.base, settings)


def test_nan_in_weights(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    path = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(InvalidAdapter, match=rf"tensor {key} has 1 NaN/Inf value\(s\)"):
        check(adapter_copy, demo_assets.base, settings)


def test_rank_above_limit(demo_assets, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("LORALINE_MAX_LORA_RANK", "1")
    with pytest.raises(InvalidAdapter, match=r"rank 8 is above max_lora_rank=1; raise LORALINE_MAX_LORA_RANK to 8"):
        check(demo_assets.checkpoint, demo_assets.base, Settings())


def test_rank_zero(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    cfg_path = adapter_copy / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 0
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapter, match=r"rank r=0 is not a positive integer"):
        check(adapter_copy, demo_assets.base, settings)


def test_max_lora_rank_setting_must_be_a_vllm_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("LORALINE_MAX_LORA_RANK", "12")
    with pytest.raises(ValidationError, match="not a value vLLM accepts for --max-lora-rank"):
        Settings()


def test_missing_adapter_files(tmp_path: Path, demo_assets, settings: Settings) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("not an adapter")
    with pytest.raises(InvalidAdapter, match="missing adapter_config.json; point --adapter at the directory"):
        check(empty, demo_assets.base, settings)


def test_missing_weights(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    (adapter_copy / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidAdapter, match=r"adapter_model.safetensors: missing; the adapter has no weights"):
        check(adapter_copy, demo_assets.base, settings)


def test_corrupt_safetensors(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    path = adapter_copy / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InvalidAdapter, match="not a readable safetensors file"):
        check(adapter_copy, demo_assets.base, settings)


def test_not_lora(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    cfg_path = adapter_copy / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["peft_type"] = "IA3"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapter, match="peft_type is 'IA3'; loraline releases LoRA adapters only"):
        check(adapter_copy, demo_assets.base, settings)


def test_dora_and_modules_to_save_are_reported_not_runtime_servable(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    cfg_path = adapter_copy / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg["modules_to_save"] = ["lm_head"]
    cfg_path.write_text(json.dumps(cfg))
    report = check(adapter_copy, demo_assets.base, settings)
    assert not report.runtime_lora_servable
    assert any("DoRA" in n for n in report.notes) and any("modules_to_save" in n for n in report.notes)


def test_base_requiring_remote_code_is_refused(demo_assets, settings: Settings, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "remote-base"
    shutil.copytree(demo_assets.base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapter, match="runs code from the model repo; .*LORALINE_TRUST_REMOTE_CODE=true"):
        check(demo_assets.checkpoint, base, settings)


def test_settings_allow_agrees_with_validation_on_the_settings_it_reads(demo_assets, settings: Settings, tmp_path: Path) -> None:
    """What a cached re-run checks instead of validating again (loraline.resume.cached_release): the verdict of the two
    checks that depend on the settings, the same as validate_adapter's for each setting."""
    import shutil

    from loraline.validation import settings_allow

    remote = tmp_path / "remote-base"
    shutil.copytree(demo_assets.base, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    cases = [(demo_assets.base, settings), (demo_assets.base, settings.model_copy(update={"max_lora_rank": 1})),
             (remote, settings), (remote, settings.model_copy(update={"trust_remote_code": True}))]
    for base, s in cases:
        try:
            check(demo_assets.checkpoint, base, s)
            valid = True
        except InvalidAdapter:
            valid = False
        assert settings_allow(demo_assets.checkpoint, base, s) is valid, (base, s.max_lora_rank, s.trust_remote_code)
    assert [settings_allow(demo_assets.checkpoint, b, s) for b, s in cases] == [True, False, False, True]


def test_hub_base_name_mismatch(adapter_copy: Path, demo_assets, settings: Settings) -> None:
    from dataclasses import replace

    cfg_path = adapter_copy / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M-Instruct"
    cfg_path.write_text(json.dumps(cfg))
    base = replace(fetch_base(str(demo_assets.base), settings), name="HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(InvalidAdapter, match="trained on 'HuggingFaceTB/SmolLM2-360M-Instruct' but the base given is 'HuggingFaceTB/SmolLM2-135M'"):
        validate_adapter(fetch_adapter(str(adapter_copy), settings), base, settings)


def test_no_tokenizer_anywhere_is_refused(adapter_copy: Path, demo_assets, settings: Settings, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "bare-base"
    shutil.copytree(demo_assets.base, base)
    for d in (base, adapter_copy):
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (d / f).unlink(missing_ok=True)
    with pytest.raises(InvalidAdapter, match="no tokenizer .* the served model needs one"):
        check(adapter_copy, base, settings)


def test_missing_chat_template_is_reported(adapter_copy: Path, demo_assets, settings: Settings, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "plain-base"
    shutil.copytree(demo_assets.base, base)
    for d in (base, adapter_copy):
        (d / "chat_template.jinja").unlink(missing_ok=True)
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(cfg))
    report = check(adapter_copy, base, settings)
    assert any("no chat template" in n for n in report.notes)
