"""The demo assets (tokenizer, tiny Llama base, Trainer checkpoint) and the Text-to-SQL task."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loraline import text2sql
from loraline.demo import DemoAssets
from loraline.tiny_models import CHAT_TEMPLATE, build_llama, build_lora, build_tokenizer

# peft reads transformers' deprecated is_gradient_checkpointing when it wraps a model.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- training


def test_training_takes_one_thread_beside_a_busy_process(tmp_path: Path) -> None:
    """`demo init --threads auto` (the default): beside a process that keeps a core busy, one torch thread; a bad
    --threads is refused naming the option."""
    import subprocess
    import sys
    import time

    from loraline.training import SharedCores

    shared = SharedCores(8)
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass"])
    try:
        time.sleep(2.5)
        assert shared.threads() == 1
    finally:
        busy.kill()
        busy.wait()
    loraline = str(Path(sys.executable).with_name("loraline"))
    proc = subprocess.run([loraline, "demo", "init", str(tmp_path / "d"), "--threads", "0"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "'0': give a number of threads (1 or more) or auto" in proc.stderr, proc.stderr
    assert not (tmp_path / "d").exists()


def test_training_loss_falls(demo_assets: DemoAssets) -> None:
    losses = demo_assets.losses
    assert len(losses) >= 10  # logged every 5 of 100 steps
    last = sum(losses[-4:]) / 4
    assert last < 0.8 * losses[0], f"loss did not fall enough: {losses}"


def test_checkpoint_has_what_a_trainer_writes(demo_assets: DemoAssets) -> None:
    ckpt = demo_assets.checkpoint
    assert ckpt.name == "checkpoint-100"
    for name in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_state.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "training_args.bin",
        "tokenizer.json",
        "tokenizer_config.json",
    ]:
        assert (ckpt / name).is_file(), f"{name} missing from {sorted(p.name for p in ckpt.iterdir())}"
    state = read_json(ckpt / "trainer_state.json")
    assert state["global_step"] == 100
    logged = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert tuple(logged) == pytest.approx(demo_assets.losses)

    config = read_json(ckpt / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert Path(config["base_model_name_or_path"]) == demo_assets.base
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # The temporary run folder is gone; only its checkpoint was kept.
    assert not list(demo_assets.base.parent.glob(".train-*"))


def test_trained_adapter_is_not_a_no_op(demo_assets: DemoAssets) -> None:
    weights = load_file(str(demo_assets.checkpoint / "adapter_model.safetensors"))
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)


# --------------------------------------------------------------------------- base model


def test_base_config_and_files(demo_assets: DemoAssets) -> None:
    base = demo_assets.base
    config = read_json(base / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 2048

    assert (base / "model.safetensors").is_file()
    assert not list(base.glob("*.bin")) and not list(base.glob("*.pt*"))
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert "lm_head.weight" not in keys  # tied: stored once, as the embedding

    generation = read_json(base / "generation_config.json")
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0
    for path in base.iterdir():  # containers read these as another user
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_base_loads_and_generates(demo_assets: DemoAssets) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets.base)
    model = AutoModelForCausalLM.from_pretrained(demo_assets.base)
    assert model.dtype == torch.bfloat16
    prompt = text2sql.render_prompt(tokenizer, "How many employees are there?")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def test_trained_adapter_loads_with_peft_and_generates(demo_assets: DemoAssets) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets.checkpoint)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo_assets.base, dtype=torch.float32), demo_assets.checkpoint
    )
    inputs = tokenizer(text2sql.render_prompt(tokenizer, "How many departments are there?"), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    # The adapter learnt that answers are SQL: its first token starts the SELECT.
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).startswith("SEL")


def test_build_llama_is_deterministic_and_needs_a_vocab(tmp_path: Path) -> None:
    a = build_llama(tmp_path / "a", vocab_size=512, seed=3)
    b = build_llama(tmp_path / "b", vocab_size=512, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert read_json(a / "generation_config.json")["eos_token_id"] == 2  # build_tokenizer's layout
    with pytest.raises(ValueError, match="vocab_size"):
        build_llama(tmp_path / "c")


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_chat_template_and_renders_a_prompt(demo_assets: DemoAssets) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets.base)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert len(tokenizer) == 2048
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1

    # A class name transformers 4.x knows too (vLLM images often bundle 4.x).
    assert read_json(demo_assets.base / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"

    prompt = text2sql.render_prompt(tokenizer, "Who earns the most?")
    assert prompt.startswith("<|im_start|>system\n")
    assert text2sql.schema_compact() in prompt
    assert prompt.endswith("<|im_start|>user\nWho earns the most?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt  # byte-level BPE round-trips exactly
    assert len(ids) < 400  # the BPE was trained on this text: prompts stay short


def test_build_tokenizer_is_deterministic(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


# --------------------------------------------------------------------------- random LoRA


def test_build_lora_has_nonzero_factors_and_changes_merged_weights(demo_assets: DemoAssets, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = build_lora(demo_assets.base, tmp_path / "lora", r=4, alpha=8)
    config = read_json(out / "adapter_config.json")
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert (out / "tokenizer.json").is_file()
    assert read_json(out / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = {k: t for k, t in weights.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7  # all-linear: 7 projections in each of 2 layers, not lm_head
    assert all(t.abs().min() > 0 for t in lora_b.values())

    base = AutoModelForCausalLM.from_pretrained(demo_assets.base, dtype=torch.float32)
    before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    assert not torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, before)

    again = build_lora(demo_assets.base, tmp_path / "again", r=4, alpha=8)
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


# --------------------------------------------------------------------------- text2sql


def test_every_pair_executes(tmp_path: Path) -> None:
    db = text2sql.create_database(tmp_path / "company.db")
    examples = text2sql.load_examples()
    assert len(examples) >= 248
    assert len({e.question for e in examples}) == len(examples)
    assert len({e.sql for e in examples}) == len(examples)
    for e in examples:
        text2sql.execute_sql(db, e.sql)  # raises on any error
    assert text2sql.execute_sql(db, "SELECT COUNT(*) FROM employees") == [(30,)]


def test_splits_are_deterministic_and_disjoint() -> None:
    every = text2sql.load_examples("all")
    train, evals = text2sql.load_examples("train"), text2sql.load_examples("eval")
    assert len(train) >= 200 and len(evals) >= 48
    # Held-out questions of shapes the train split teaches: each eval query's shape (literals masked) is trained at
    # least twice, with other values.
    import re

    def shape(sql: str) -> str:
        return re.sub(r"\b\d+\b", "K", re.sub(r"'[^']*'", "V", sql))

    trained = [shape(e.sql) for e in train]
    assert all(trained.count(shape(e.sql)) >= 2 for e in evals)
    assert text2sql.load_examples("eval") == evals  # deterministic: the split is in the data
    # No eval question, and no eval SQL statement, is seen in training.
    assert not {e.question for e in train} & {e.question for e in evals}
    assert not {e.sql for e in train} & {e.sql for e in evals}
    assert len(train) + len(evals) == len(every)
    with pytest.raises(ValueError, match="split"):
        text2sql.load_examples("test")


def test_eval_split_covers_twelve_question_kinds_all_seen_in_training() -> None:
    from collections import Counter

    kinds = Counter(text2sql.question_kind(e.sql) for e in text2sql.load_examples("eval"))
    assert len(kinds) >= 12, kinds
    assert {"join", "join3", "self-join", "group-by", "top-n", "aggregate", "count", "subquery"} <= set(kinds)
    trained = {text2sql.question_kind(e.sql) for e in text2sql.load_examples("train")}
    assert set(kinds) <= trained  # every kind asked is one the adapter was trained on
    assert text2sql.question_kind("SELECT d.name, COUNT(*) FROM employees e JOIN departments d ON e.department_id = d.id "
                                  "GROUP BY d.name HAVING COUNT(*) > 3") == "group-having"
    assert text2sql.question_kind("SELECT name FROM employees ORDER BY salary DESC LIMIT 3") == "top-n"


def test_prompt_carries_the_compact_schema() -> None:
    ddl, compact = text2sql.schema_ddl(), text2sql.schema_compact()
    assert ddl.count("CREATE TABLE") == 4 and "INSERT" not in ddl
    # One line per table with every column of the DDL, and nothing else: a fraction of the DDL's size.
    assert compact.splitlines()[1] == "employees(id, name, title, salary, hire_date, department_id, manager_id)"
    assert [line.split("(")[0] for line in compact.splitlines()] == ["departments", "employees", "projects", "assignments"]
    assert len(compact) < len(ddl) / 2
    messages = text2sql.chat_messages("How many projects are active?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert compact in messages[0]["content"] and messages[1]["content"] == "How many projects are active?"


def test_execute_sql_is_read_only(tmp_path: Path) -> None:
    db = text2sql.create_database(tmp_path / "company.db")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        text2sql.execute_sql(db, "DELETE FROM employees")
    assert text2sql.execute_sql(db, "SELECT COUNT(*) FROM employees") == [(30,)]
    with pytest.raises(FileNotFoundError):
        text2sql.execute_sql(tmp_path / "missing.db", "SELECT 1")


def test_frozen_layers_computed_once_train_the_same_adapter(demo_assets: DemoAssets, tmp_path: Path) -> None:
    """LoRA on the last layer only: computing the frozen layer below once per example (the demo's shortcut) gives the
    losses and the adapter that computing it at every step gives, and the adapter names the same modules."""
    from loraline.training import train_adapter

    runs = {}
    for cached in (True, False):
        ckpt, losses = train_adapter(demo_assets.base, tmp_path / f"run-{cached}", steps=15, last_layers=1,
                                     cache_frozen=cached)
        runs[cached] = (load_file(str(ckpt / "adapter_model.safetensors")), losses)
    (a, la), (b, lb) = runs[True], runs[False]
    assert la == pytest.approx(lb, abs=1e-4)
    assert sorted(a) == sorted(b) and all(".layers.1." in k for k in a)  # the last of the tiny model's 2 layers
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert read_json(ckpt / "adapter_config.json")["layers_to_transform"] == [1]
