"""merge + parity: the merged model keeps the base's dtype and size and generates what base + adapter generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraline.digest import digest_dir, dir_bytes
from loraline.errors import ParityError
from loraline.merge import merge_adapter
from loraline.parity import Generation, check_parity, judge, parity_prompts, require_parity
from loraline.settings import Settings
from loraline.sources import fetch_adapter, fetch_base


@pytest.fixture()
def merged(demo_assets, settings: Settings):
    a = fetch_adapter(str(demo_assets.checkpoint), settings)
    b = fetch_base(str(demo_assets.base), settings)
    return a, b, merge_adapter(a, b, settings)


def test_merged_model_keeps_dtype_size_tokenizer_and_ties(merged, demo_assets) -> None:
    a, b, m = merged
    cfg = json.loads((m.path / "config.json").read_text())
    assert m.dtype == "bfloat16" and cfg["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(m.path / "model.safetensors")).values()} == {torch.bfloat16}
    base_weights = sum(p.stat().st_size for p in demo_assets.base.glob("*.safetensors"))
    merged_weights = sum(p.stat().st_size for p in m.path.glob("*.safetensors"))
    assert abs(merged_weights - base_weights) / base_weights < 0.02  # never an fp32 (2x) model
    assert cfg["tie_word_embeddings"] is True and m.tied_embeddings
    assert "lm_head.weight" not in load_file(str(m.path / "model.safetensors"))
    assert "<|im_start|>" in (m.path / "chat_template.jinja").read_text() or "<|im_start|>" in (m.path / "tokenizer_config.json").read_text()
    assert (m.path / "generation_config.json").is_file()
    assert not list(m.path.glob("*.bin")) and not list(m.path.glob("adapter_*"))
    assert m.sha256 == digest_dir(m.path) and m.bytes == dir_bytes(m.path)
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in m.path.iterdir())  # readable by a non-root server


def test_merged_weights_are_base_plus_scaled_lora(merged, demo_assets) -> None:
    a, b, m = merged
    base = load_file(str(demo_assets.base / "model.safetensors"))
    lora = load_file(str(a.path / "adapter_model.safetensors"))
    cfg = json.loads((a.path / "adapter_config.json").read_text())
    out = load_file(str(m.path / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj"
    A = lora[f"base_model.model.{key}.lora_A.weight"].float()
    B = lora[f"base_model.model.{key}.lora_B.weight"].float()
    expected = base[f"{key}.weight"].float() + (cfg["lora_alpha"] / cfg["r"]) * (B @ A)
    got = out[f"{key}.weight"].float()
    assert not torch.equal(got, base[f"{key}.weight"].float())  # the adapter changed the weights
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)  # bf16 rounding of the sum


def test_second_merge_reuses_the_result(merged, settings: Settings) -> None:
    a, b, m = merged
    mtime = (m.path / "model.safetensors").stat().st_mtime_ns
    again = merge_adapter(a, b, settings)
    assert again.sha256 == m.sha256 and again.seconds == 0.0
    assert (m.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_parity_merged_vs_peft_unmerged(merged, settings: Settings) -> None:
    a, b, m = merged
    report = require_parity(check_parity(a.path, b.path, m.path, parity_prompts(m.path, settings), settings))
    assert report.prompts == settings.parity_prompts
    assert report.identical + report.close == report.prompts and report.failed == 0
    assert report.max_abs_logprob_diff < 0.5
    # The trained adapter writes SQL (the prompts are text-to-SQL questions).
    assert sum("select" in r.a_text.lower() for r in report.results) >= report.prompts // 2


def test_parity_catches_a_merge_that_lost_the_adapter(merged, demo_assets, settings: Settings) -> None:
    a, b, _ = merged
    # The plain base stands in for a merged model that silently dropped the adapter.
    report = check_parity(a.path, b.path, demo_assets.base, parity_prompts(demo_assets.base, settings), settings)
    assert report.failed > 0
    with pytest.raises(ParityError, match=r"parity peft-unmerged vs merged failed on \d+ of 8 prompts"):
        require_parity(report)


def g(tokens, top):
    return Generation(tuple(tokens), tuple(0.0 for _ in tokens), tuple(top))


def test_judge_rule() -> None:
    same = g([1, 2, 3], [{1: -0.1}, {2: -0.1}, {3: -0.1}])
    assert judge(same, same, 5)[:2] == ("identical", None)
    a = g([1, 2, 3], [{1: -0.1}, {2: -0.5, 7: -0.9}, {3: -0.1}])
    b = g([1, 7, 4], [{1: -0.1}, {7: -0.4, 2: -0.6}, {4: -0.1}])
    assert judge(a, b, 5)[:2] == ("close", 1)
    c = g([1, 9, 4], [{1: -0.1}, {9: -0.4, 8: -0.6}, {4: -0.1}])
    assert judge(a, c, 5)[:2] == ("failed", 1)
    assert judge(a, b, 1)[0] == "failed"  # 7 is not A's top-1


def test_merged_tokenizer_config_is_portable(merged) -> None:
    _, _, m = merged
    cfg = json.loads((m.path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x (older vLLM images) knows this name
    assert "is_local" not in cfg and "local_files_only" not in cfg


def test_dora_adapter_is_not_runtime_servable_but_merges_with_parity(demo_assets, settings: Settings, tmp_path: Path) -> None:
    """vLLM cannot serve DoRA as runtime LoRA; the merged model is a plain Llama and reproduces it."""
    from peft import LoraConfig, get_peft_model

    from loraline.hf_models import load_causal_lm
    from loraline.validation import validate_adapter

    model = get_peft_model(load_causal_lm(demo_assets.base, settings), LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    dora = tmp_path / "dora"
    model.save_pretrained(str(dora))
    a, b = fetch_adapter(str(dora), settings), fetch_base(str(demo_assets.base), settings)
    report = validate_adapter(a, b, settings)
    assert not report.runtime_lora_servable and any("DoRA" in n for n in report.notes)
    m = merge_adapter(a, b, settings)
    assert not any("lora" in k or "magnitude" in k for k in load_file(str(m.path / "model.safetensors")))
    parity = require_parity(check_parity(a.path, b.path, m.path, parity_prompts(m.path, settings)[:3], settings))
    assert parity.failed == 0


def test_the_merge_cache_key_names_the_directory_it_writes(demo_merged, tmp_path: Path) -> None:
    """Two homes on one Prefect result store: a cached merge names its path, so each home gets its own key (else one
    home's release was handed the other's merged directory); one home, one key."""
    from loraline.merge import merge_key

    adapter, base, _ = demo_merged
    a, b = Settings(home=tmp_path / "a"), Settings(home=tmp_path / "b")
    assert merge_key(adapter, base, a) == merge_key(adapter, base, Settings(home=tmp_path / "a"))
    assert merge_key(adapter, base, a) != merge_key(adapter, base, b)


_NO_BF16_CPU = """
import json, sys
from pathlib import Path
import torch
from loraline.hf_models import compute_dtype_name, load_causal_lm
from loraline.merge import merge_adapter
from loraline.parity import check_parity, parity_prompts
from loraline.settings import Settings
from loraline.sources import fetch_adapter, fetch_base

s = Settings(home=Path(sys.argv[1]))
a, b = fetch_adapter(sys.argv[2], s), fetch_base(sys.argv[3], s)
m = merge_adapter(a, b, s)
report = check_parity(a.path, b.path, m.path, parity_prompts(m.path, s), s)
print(json.dumps({"bf16": compute_dtype_name("bfloat16"), "fp16": compute_dtype_name("float16"),
                  "cuda": compute_dtype_name("bfloat16", "cuda"), "fp32": compute_dtype_name("float32"),
                  "loaded": str(load_causal_lm(m.path, s).dtype), "merged_sha256": m.sha256,
                  "failed": report.failed, "prompts": report.prompts}))
"""


def test_a_cpu_without_bf16_instructions_computes_in_float32(merged, demo_assets, tmp_path: Path) -> None:
    """On a CPU without bf16 matmul instructions (an AVX2-only one: bf16 there ran ~6x slower than float32), the
    transformers side computes a bf16 model in float32; the merged weights stay bf16, byte for byte the same, and
    parity holds. oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA``) stands in for such a CPU on this one."""
    import os
    import subprocess
    import sys

    a, b, m = merged
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-c", _NO_BF16_CPU, str(tmp_path / "home"), str(demo_assets.checkpoint),
                           str(demo_assets.base)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["bf16"], out["fp16"], out["fp32"], out["cuda"]) == ("float32", "float32", "float32", "bfloat16")
    assert out["loaded"] == "torch.float32"
    assert out["merged_sha256"] == m.sha256  # the merge computes in float32 anyway and writes the base's bf16
    assert out["failed"] == 0 and out["prompts"] == 8
