"""The direct merge (plain LoRA added into the base's safetensors, no peft model) writes bit for bit what peft's
``merge_and_unload(safe_merge=True)`` path writes, on every layout it takes; everything else falls back to peft and
says why (issue 16 §4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraline.errors import MergeError
from loraline.merge import MergedModel, merge_adapter
from loraline.settings import Settings
from loraline.sources import fetch_adapter, fetch_base
from loraline.tiny_models import build_llama, build_lora

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def merge_both(adapter: Path, base: Path, root: Path, **settings: Any) -> tuple[MergedModel, MergedModel]:
    """(as a release merges it, with LORALINE_MERGE_METHOD=peft), each in a home of its own."""
    out = []
    for method in ("auto", "peft"):
        s = Settings(home=root / method, merge_method=method, **settings)
        out.append(merge_adapter(fetch_adapter(str(adapter), s), fetch_base(str(base), s), s))
    return out[0], out[1]


def assert_identical(direct: MergedModel, peft: MergedModel) -> None:
    assert (direct.method, direct.fallback_reason, peft.method) == ("direct", None, "peft")
    files = sorted(p.name for p in direct.path.iterdir())
    assert files == sorted(p.name for p in peft.path.iterdir())
    for name in files:
        if name.endswith(".safetensors"):
            a, b = load_file(str(direct.path / name)), load_file(str(peft.path / name))
            assert list(a) == list(b)
            for k in a:  # every tensor, bit for bit
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert (direct.path / name).read_bytes() == (peft.path / name).read_bytes(), name
    assert direct.sha256 == peft.sha256
    assert (direct.dtype, direct.bytes, direct.parameters, direct.tied_embeddings) == \
        (peft.dtype, peft.bytes, peft.parameters, peft.tied_embeddings)


@pytest.fixture(scope="module")
def tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_assets.base))


def llama(root: Path, tokenizer, **kw: Any) -> Path:
    return build_llama(root / "base", tokenizer=tokenizer, hidden_size=128, num_heads=4, num_kv_heads=2, **kw)


CASES = {
    # GQA (4 query heads, 2 KV heads), tied embeddings, every linear layer
    "gqa-tied-all-linear": ({}, {"r": 8}),
    # an untied head (saved, not adapted: peft saves the whole head with an adapter that targets it)
    "untied-head": ({"tie_word_embeddings": False}, {"r": 4}),
    # rsLoRA (alpha / sqrt(r)), per-module ranks and alphas by pattern
    "rslora-rank-alpha-pattern": ({}, {"r": 8, "alpha": 16, "use_rslora": True,
                                       "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 12},
                                       "alpha_pattern": {"v_proj": 7, "up_proj": 3.5}}),
    # a layer subset, as the real demo's fine-tune (its last layers)
    "layers-to-transform": ({"num_layers": 3}, {"r": 8, "target_modules": LINEAR, "layers_to_transform": [1, 2]}),
    # a float32 base, kept float32
    "float32-base": ({"dtype": torch.float32}, {"r": 8}),
}


@pytest.mark.parametrize("case", CASES)
def test_direct_merge_is_bit_identical_to_peft(case: str, tokenizer, tmp_path: Path) -> None:
    model, lora = CASES[case]
    base = llama(tmp_path, tokenizer, **model)
    adapter = build_lora(base, tmp_path / "adapter", **lora)
    direct, peft = merge_both(adapter, base, tmp_path)
    assert_identical(direct, peft)
    assert direct.tied_embeddings is model.get("tie_word_embeddings", True)


def test_sharded_base_and_other_dtypes(tokenizer, tmp_path: Path) -> None:
    """A base in shards (its index read, each tensor from its shard), in float32, merged into bf16 and into float16, and
    computed in the output dtype (LORALINE_MERGE_COMPUTE_DTYPE=auto): the same as peft each time."""
    from transformers import AutoModelForCausalLM

    one = llama(tmp_path / "one", tokenizer, dtype=torch.float32)
    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(one), dtype=torch.float32).save_pretrained(str(base), max_shard_size="300KB")
    for f in one.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation")):
            shutil.copy(f, base / f.name)
    assert len(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(base.glob("model-*.safetensors"))) > 3
    adapter = build_lora(base, tmp_path / "adapter", r=8)
    for i, settings in enumerate([{}, {"merge_dtype": "bfloat16"}, {"merge_dtype": "float16"},
                                  {"merge_dtype": "bfloat16", "merge_compute_dtype": "auto"}]):
        direct, peft = merge_both(adapter, base, tmp_path / f"merge-{i}", **settings)
        assert_identical(direct, peft)
        assert direct.dtype == settings.get("merge_dtype", "float32")


def test_sharded_output_matches_save_pretrained(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model bigger than a shard (50 GB in production; 200 KB here) is written in save_pretrained's shards, with its
    index, by both paths alike."""
    import loraline.merge

    monkeypatch.setattr(loraline.merge, "MAX_SHARD_SIZE", "200KB")
    base = llama(tmp_path, tokenizer)
    direct, peft = merge_both(build_lora(base, tmp_path / "adapter", r=8), base, tmp_path)
    assert (direct.path / "model.safetensors.index.json").is_file() and len(list(direct.path.glob("model-*"))) > 3
    assert_identical(direct, peft)


@pytest.mark.parametrize("hash_cpus, write_cpus", [(999, 999), (1, 1)], ids=["inline", "writer-and-hasher-threads"])
def test_with_or_without_threads(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hash_cpus: int,
                                 write_cpus: int) -> None:
    """With an idle core the merge hashes in a thread of its own, from 4 CPUs it also writes in another; on one CPU or
    a busy machine all of it runs in the caller's thread: the same bytes each way."""
    import loraline.direct_merge

    monkeypatch.setattr(loraline.direct_merge, "_HASH_THREAD_CPUS", hash_cpus)
    monkeypatch.setattr(loraline.direct_merge, "_THREADED_CPUS", write_cpus)
    monkeypatch.setattr(loraline.direct_merge, "_cpus", lambda: (8, 8.0))  # idle, whatever the machine's load now
    base = llama(tmp_path, tokenizer, num_layers=3)
    direct, peft = merge_both(build_lora(base, tmp_path / "adapter", r=8), base, tmp_path)
    assert_identical(direct, peft)


def test_gpt2_conv1d_fan_in_fan_out(demo_assets, tmp_path: Path) -> None:
    """GPT-2 keeps its projections as Conv1D, weights (in, out): peft merges the transposed delta (fan_in_fan_out)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    ref = json.loads((demo_assets.base / "config.json").read_text())
    config = GPT2Config(vocab_size=ref["vocab_size"], n_embd=128, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=ref["bos_token_id"], eos_token_id=ref["eos_token_id"])
    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(str(base))
    for f in demo_assets.base.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, base / f.name)
    adapter = build_lora(base, tmp_path / "adapter", r=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    direct, peft = merge_both(adapter, base, tmp_path)
    assert_identical(direct, peft)


def test_base_without_generation_config(tokenizer, tmp_path: Path) -> None:
    """No generation_config.json in the base: both write the one transformers derives from the model's config."""
    base = llama(tmp_path, tokenizer)
    (base / "generation_config.json").unlink()
    direct, peft = merge_both(build_lora(base, tmp_path / "adapter", r=8), base, tmp_path)
    assert (direct.path / "generation_config.json").is_file()
    assert_identical(direct, peft)


@pytest.mark.slow
def test_the_benchmark_model_is_bit_identical(tmp_path: Path) -> None:
    """benchmarks/merge_bench.py's 100.1M-parameter bf16 Llama (hidden 768, 12 layers, vocab 32000, tied), rank 16 on
    every linear layer."""
    from loraline.tiny_models import build_tokenizer

    base = build_llama(tmp_path / "base", tokenizer=build_tokenizer(tmp_path / "base"), vocab_size=32000, hidden_size=768,
                       num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048)
    direct, peft = merge_both(build_lora(base, tmp_path / "adapter", r=16), base, tmp_path)
    assert direct.parameters == 100_092_672
    assert_identical(direct, peft)


def test_the_real_demo_is_bit_identical(real_demo, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (from its GGUF) and the demo's Trainer checkpoint-100: what a release merges."""
    direct, peft = merge_both(real_demo.checkpoint, real_demo.base, tmp_path)
    assert_identical(direct, peft)


FALLBACKS = {
    "dora": ({"use_dora": True, "target_modules": ["q_proj", "v_proj"]}, "use_dora=True"),
    "embedding-lora": ({"target_modules": ["embed_tokens", "q_proj"]}, "Embedding"),
    "modules-to-save": ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
    # peft saves the embeddings beside such an adapter (save_embedding_layers), which it loads into the model
    "head-adapted": ({"target_modules": ["q_proj", "lm_head"]}, "lm_head.base_layer.weight"),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_what_is_not_plain_lora_falls_back_to_peft_and_says_why(case: str, tokenizer, tmp_path: Path) -> None:
    lora, reason = FALLBACKS[case]
    base = llama(tmp_path, tokenizer)
    adapter = build_lora(base, tmp_path / "adapter", r=4, **lora)
    s = Settings(home=tmp_path / "home")
    m = merge_adapter(fetch_adapter(str(adapter), s), fetch_base(str(base), s), s)
    assert m.method == "peft" and reason in (m.fallback_reason or ""), m.fallback_reason
    assert json.loads(m.path.with_name(m.path.name + ".json").read_text())["method"] == "peft"


def test_unknown_adapter_keys_fall_back(tokenizer, tmp_path: Path) -> None:
    """A tensor in the adapter that is not one of peft's LoRA keys for this base is left to peft to judge."""
    base = llama(tmp_path, tokenizer)
    adapter = build_lora(base, tmp_path / "adapter", r=4)
    f = adapter / "adapter_model.safetensors"
    save_file({**load_file(str(f)), "base_model.model.model.norm.extra": torch.zeros(3)}, str(f))
    s = Settings(home=tmp_path / "home")
    m = merge_adapter(fetch_adapter(str(adapter), s), fetch_base(str(base), s), s)
    assert m.method == "peft" and "model.norm.extra" in (m.fallback_reason or "")


def test_a_non_finite_merge_is_refused_naming_the_layer(tokenizer, tmp_path: Path) -> None:
    base = llama(tmp_path, tokenizer)
    adapter = build_lora(base, tmp_path / "adapter", r=4)
    f = adapter / "adapter_model.safetensors"
    weights = load_file(str(f))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    weights[key][3, 2] = float("nan")
    save_file(weights, str(f))
    s = Settings(home=tmp_path / "home")
    with pytest.raises(MergeError, match=r"v_proj\.lora_B\.weight into model\.layers\.1\.self_attn\.v_proj\.weight gives non-finite weights"):
        merge_adapter(fetch_adapter(str(adapter), s), fetch_base(str(base), s), s)
    assert not [p for p in s.merged_dir.iterdir() if not p.name.startswith(".")]  # nothing a later step could pick up
