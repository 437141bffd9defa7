"""vLLM in the loop, for real: the runner, vLLM parity against HF peft, and the OpenAI server, on CPU.

Every engine start costs ~20-30 s on these machines, so each test starts at most what it must:
one runner call serves several prompts, one server start serves every endpoint check.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from loraline.engine import find_engine, run_generate, vllm_lora_rank
from loraline.errors import EngineError, ParityError
from loraline.hf_models import load_tokenizer
from loraline.parity import (check_vllm_parity, encode_prompts, hf_peft_generations, parity_prompts, report,
                             require_parity, vllm_generations)
from loraline.server import serve_openai
from loraline.settings import Settings
from loraline.text2sql import chat_messages, load_examples


@pytest.fixture()
def engine_settings(vllm_python: Path, settings: Settings) -> Settings:
    return settings


def prompt_ids(merged_dir: Path, settings: Settings, n: int) -> list[list[int]]:
    """The first ``n`` parity prompts (eval questions in the chat template) as token ids."""
    return encode_prompts(load_tokenizer(merged_dir, merged_dir, settings), parity_prompts(merged_dir, settings)[:n])


def test_missing_or_broken_engine_python_names_the_setting_and_the_fix(tmp_path: Path, home: Path) -> None:
    cases = {
        None: r"LORALINE_VLLM_PYTHON is not set",
        tmp_path / "nope" / "python": r"is not an executable file",
        Path(sys.executable): r"cannot `import vllm`",  # the orchestrator's venv has no vLLM, on purpose
    }
    for python, message in cases.items():
        with pytest.raises(EngineError, match=message) as err:
            find_engine(Settings(vllm_python=python))
        assert "LORALINE_VLLM_PYTHON" in str(err.value) and "make setup" in str(err.value)


def test_the_engine_make_setup_built_is_found_from_a_plain_shell(tmp_path: Path) -> None:
    """`.venv/bin/loraline` run from a shell that exported nothing finds the .venv-vllm `make setup` made (issue 13)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "LORALINE_VLLM_PYTHON"}
    env["LORALINE_HOME"] = str(tmp_path / "home")
    code = ("import json; from loraline.engine import find_engine; from loraline.settings import Settings; "
            "e = find_engine(Settings()); print(json.dumps({'python': str(e.python), 'vllm': e.vllm_version}))")
    # The orchestrator's Python, from another directory: nothing but its venv's place says where the engine is.
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["python"] == str(Path(sys.prefix).absolute().parent / ".venv-vllm" / "bin" / "python")
    assert found["python"] == str(repo / ".venv-vllm" / "bin" / "python") and found["vllm"]
    # An explicit setting still wins over the venv found beside (here: one that cannot `import vllm`).
    env["LORALINE_VLLM_PYTHON"] = sys.executable
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and f"LORALINE_VLLM_PYTHON={sys.executable} cannot `import vllm`" in proc.stderr


@pytest.mark.slow
def test_runner_with_runtime_lora_returns_the_requested_tokens_and_logprobs(demo_merged, engine_settings: Settings) -> None:
    # One engine start covers the runner's contract; the merged model goes through the same
    # runner in the parity test below (and must match HF token for token there).
    adapter, base, merged = demo_merged
    ids = prompt_ids(merged.path, engine_settings, 3)
    lora = ("sql", adapter.path, vllm_lora_rank(adapter.path))
    out = run_generate(base.path, ids, engine_settings, lora=lora, max_tokens=12, logprobs=3, ignore_eos=True)
    assert out["vllm_version"] and out["timings"]["engine_start_s"] > 0
    assert len(out["outputs"]) == 3
    for o in out["outputs"]:
        assert len(o["token_ids"]) == 12 == len(o["logprobs"]) == len(o["chosen_logprobs"])  # ignore_eos: never stops early
        for tok, step, chosen in zip(o["token_ids"], o["logprobs"], o["chosen_logprobs"]):
            assert len(step) >= 3 and step[str(tok)] == chosen <= 0.0
            assert chosen == max(step.values())  # greedy: the chosen token is the most likely one
    # The fine-tune writes SQL; the demo base alone does not (it rambles "NOT NULL NOT NULL ...").
    assert all(o["text"].lstrip().upper().startswith("SELECT") for o in out["outputs"]), [o["text"] for o in out["outputs"]]
    print("runner timings (base + LoRA):", out["timings"])


@pytest.mark.slow
def test_vllm_merged_and_runtime_lora_match_hf_peft(demo_merged, engine_settings: Settings) -> None:
    adapter, base, merged = demo_merged
    prompts = parity_prompts(merged.path, engine_settings)
    merged_report, lora_report = check_vllm_parity(adapter.path, base.path, merged.path, prompts, engine_settings)
    for rep in (merged_report, lora_report):
        require_parity(rep)
        assert (rep.a, rep.prompts, rep.failed) == ("hf-peft", engine_settings.parity_prompts, 0)
        assert rep.identical >= rep.prompts // 2  # mostly token-for-token, not just "close"
        assert rep.max_abs_logprob_diff < 0.5
    assert (merged_report.b, lora_report.b) == ("vllm-merged", "vllm-lora")
    print("vLLM parity:", merged_report.summary(), lora_report.summary())
    # Both engines ran in one engine process, the LoRA one second (warm): in a process of its own it answers the same,
    # so every prompt's verdict, divergence, logprob difference and text are those of separate processes.
    ids = encode_prompts(load_tokenizer(merged.path, merged.path, engine_settings), prompts)
    reference = hf_peft_generations(adapter.path, base.path, merged.path, ids, engine_settings)
    alone, _ = vllm_generations(base.path, ids, engine_settings, lora=("adapter", adapter.path, vllm_lora_rank(adapter.path)))
    separate = report("hf-peft", "vllm-lora", prompts, reference, alone, top_k=engine_settings.parity_top_k,
                      max_new_tokens=engine_settings.parity_max_new_tokens, seconds=0.0)
    assert lora_report.results == separate.results


@pytest.mark.slow
def test_vllm_parity_fails_when_vllm_serves_the_base_as_merged(demo_merged, engine_settings: Settings) -> None:
    adapter, base, _ = demo_merged
    # The plain base stands in for a merged model (or an engine) that silently lost the adapter.
    prompts = parity_prompts(base.path, engine_settings)
    merged_report, lora_report = check_vllm_parity(adapter.path, base.path, base.path, prompts, engine_settings)
    assert merged_report.failed > 0
    assert lora_report.failed == 0  # the runtime-LoRA side still loads the real adapter
    with pytest.raises(ParityError, match=r"parity hf-peft vs vllm-merged failed on \d+ of 8 prompts"):
        require_parity(merged_report)


@pytest.mark.slow
def test_openai_server_serves_base_and_lora_then_stops(demo_merged, engine_settings: Settings) -> None:
    adapter, base, merged = demo_merged
    question = load_examples("eval")[0].question
    prompt = parity_prompts(merged.path, engine_settings)[0]
    t0 = time.perf_counter()
    with serve_openai(
        base.path,
        engine_settings,
        served_model_name="smol-base",
        lora_modules={"smol-sql": adapter.path},
        max_lora_rank=vllm_lora_rank(adapter.path),
    ) as server:
        print(f"server healthy after {time.perf_counter() - t0:.1f}s")
        assert server.url.startswith("http://127.0.0.1:") and server.log_path.is_file()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert {m["id"] for m in models["data"]} == {"smol-base", "smol-sql"}

        def complete(model: str) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        lora_text, base_text = complete("smol-sql"), complete("smol-base")
        assert lora_text.lstrip().upper().startswith("SELECT") and lora_text != base_text  # the module is applied

        chunks: list[str] = []
        body = {"model": "smol-sql", "messages": chat_messages(question), "max_tokens": 16, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    chunks.append(delta.get("content") or "")
        assert len([c for c in chunks if c]) > 1  # streamed, not one blob
        # The server renders the same chat template, so the streamed answer is the completion's.
        assert "".join(chunks) == lora_text
        pid, port = server.pid, server.port

    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # and the port is free again


@pytest.mark.slow
def test_runner_past_its_timeout_is_killed_with_the_log(demo_merged, vllm_python: Path, home: Path) -> None:
    _, _, merged = demo_merged
    settings = Settings(engine_timeout_s=3)  # less than `import vllm` takes
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match=r"did not finish within 3s and was killed; raise LORALINE_ENGINE_TIMEOUT_S"):
        run_generate(merged.path, [[1, 2, 3]], settings, max_tokens=4)
    assert time.perf_counter() - t0 < 60  # the kill is prompt (the engine probe is cached or takes ~6 s)


@pytest.mark.slow
def test_server_that_dies_at_start_fails_early_with_its_log(demo_merged, engine_settings: Settings) -> None:
    _, _, merged = demo_merged
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match=r"exited with status \d+ before it was healthy") as err:
        with serve_openai(merged.path, engine_settings, served_model_name="x", extra_args=["--no-such-flag"]):
            pytest.fail("a server with an unknown flag came up")
    assert "--no-such-flag" in str(err.value)  # the log tail says what went wrong
    assert time.perf_counter() - t0 < engine_settings.engine_timeout_s / 2  # did not wait for the timeout
