"""Bases that are not the demo's Llama: other architectures, other context lengths (issue 13).

A base whose context is shorter than the 2,048 tokens CPU engines are started with failed every release in vLLM
parity ("User-specified max_model_len (2048) is greater than the derived max_model_len"): the engine (offline runner
and OpenAI server) and the serving image now follow the model's own context, read from its config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from mlflow import MlflowClient

from loraline.tiny_models import build_lora
from loraline.engine import CPU_MAX_MODEL_LEN, max_model_len, vllm_lora_rank
from loraline.image import build_args
from loraline.hf_models import context_length
from loraline.settings import Settings

QWEN2_POSITIONS = 512


def build_qwen2(out_dir: Path, tokenizer_dir: Path, *, positions: int, seed: int = 0) -> Path:
    """A randomly initialised ``Qwen2ForCausalLM`` with ``positions`` positions, built locally from a config (no
    download), saved as safetensors with the tokenizer of ``tokenizer_dir``. head_dim 64: vLLM's CPU attention refuses
    smaller heads."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    ref = json.loads((tokenizer_dir / "config.json").read_text())
    ids = {k: ref.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = Qwen2Config(vocab_size=ref["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=positions,
                         tie_word_embeddings=True, initializer_range=0.1, dtype=torch.bfloat16, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="module")
def qwen2_short(demo_assets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base, adapter): a tiny Qwen2 with 512 positions and a random LoRA on every linear layer of it."""
    root = tmp_path_factory.mktemp("qwen2-short")
    base = build_qwen2(root / "base", demo_assets.base, positions=QWEN2_POSITIONS)
    return base, build_lora(base, root / "adapter", r=8)


def write_config(d: Path, config: dict, tokenizer: dict | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return d


def test_context_length_is_read_from_each_architectures_config_key(tmp_path: Path) -> None:
    cases = {
        "llama": ({"max_position_embeddings": 4096}, None, 4096),
        "gpt2": ({"n_positions": 1024, "n_ctx": 1024}, None, 1024),
        "mpt": ({"max_seq_len": 768}, None, 768),
        "chatglm": ({"seq_length": 640}, None, 640),
        "smallest-wins": ({"max_position_embeddings": 8192, "seq_length": 1000}, None, 1000),
        "sliding-window-does-not-shorten": ({"max_position_embeddings": 32768, "sliding_window": 256,
                                             "use_sliding_window": True}, None, 32768),
        "multimodal-text-config": ({"text_config": {"max_position_embeddings": 300}}, None, 300),
        "tokenizer-limit": ({"max_position_embeddings": 4096}, {"model_max_length": 1500}, 1500),
        "tokenizer-no-limit": ({"max_position_embeddings": 4096}, {"model_max_length": 1e30}, 4096),
        "unknown": ({"hidden_size": 64}, None, None),
    }
    for name, (config, tokenizer, want) in cases.items():
        d = write_config(tmp_path / name, config, tokenizer)
        assert context_length(d) == want, name
        # CPU engines: the model's context, at most the cap; on CUDA, vLLM derives it itself.
        assert max_model_len(d, "cpu") == min(want or CPU_MAX_MODEL_LEN, CPU_MAX_MODEL_LEN), name
        assert max_model_len(d, "cuda") is None


def test_the_image_serves_the_model_context_not_more(qwen2_short: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = qwen2_short
    lineage = {"model_name": "qwen-short"}
    s = Settings(home=tmp_path / "home")

    def max_len(settings: Settings, cpu_base: bool, model_dir: Path = base) -> str:
        return build_args(lineage, "merged", settings, cpu_base=cpu_base, model_dir=model_dir, lora_rank=8)["MAX_MODEL_LEN"]

    assert max_len(s, cpu_base=True) == "512"  # its 512 positions, under the CPU cap
    assert max_len(s, cpu_base=False) == ""  # a GPU base: the Dockerfile passes no flag, vLLM serves the model's own
    long = write_config(tmp_path / "long", {"max_position_embeddings": 131072})
    assert max_len(s, cpu_base=True, model_dir=long) == str(CPU_MAX_MODEL_LEN)
    assert max_len(s.model_copy(update={"image_max_model_len": 256}), cpu_base=True) == "256"  # the setting wins


@pytest.mark.slow
def test_lora_on_a_512_position_qwen2_releases_with_vllm_parity(qwen2_short: tuple[Path, Path], vllm_python: Path,
                                                                 prefect_harness, settings: Settings,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from loraline_flows.release import release

    base, adapter = qwen2_short
    assert json.loads((base / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    monkeypatch.setenv("LORALINE_VLLM_PARITY", "true")  # real vLLM on CPU, merged and base + runtime LoRA
    out = release(adapter=str(adapter), base=str(base), name="qwen-short")
    assert out["model_version"] == "1" and out["merged"]["method"] == "direct"  # another architecture, merged directly
    vp = out["vllm_parity"]
    assert set(vp) == {"vllm-merged", "vllm-lora"}
    for side, report in vp.items():
        assert report["failed"] == 0 and report["identical"] + report["close"] == report["prompts"] > 0, (side, report)
        assert report["max_model_len"] == QWEN2_POSITIONS, (side, report)
    metrics = MlflowClient(settings.resolved_tracking_uri).get_run(out["mlflow_run_id"]).data.metrics
    assert metrics["vllm_merged_max_model_len"] == metrics["vllm_lora_max_model_len"] == QWEN2_POSITIONS


@pytest.mark.slow
def test_openai_server_serves_the_short_base_with_its_lora(qwen2_short: tuple[Path, Path], vllm_python: Path,
                                                           settings: Settings) -> None:
    """The server the benchmark starts: up on the 512-position base with the adapter, and says it serves 512."""
    from loraline.server import serve_openai

    base, adapter = qwen2_short
    with serve_openai(base, settings, served_model_name="qwen-base", lora_modules={"qwen-lora": adapter},
                      max_lora_rank=vllm_lora_rank(adapter)) as server:
        models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}
        assert set(models) == {"qwen-base", "qwen-lora"}
        assert models["qwen-base"]["max_model_len"] == QWEN2_POSITIONS
        body = {"model": "qwen-lora", "prompt": [1, 5, 9], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
