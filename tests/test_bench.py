"""The vLLM side of the benchmark protocol: the runner's bench mode through :func:`loraline.engine.run_bench`.

GPU numbers come from benchmarks/gpu_bench.py on a GPU machine (benchmarks/GPU.md); here the same code
path runs on CPU with a tiny model, once (one engine start, ~20-30 s).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraline.errors import EngineError
from loraline.engine import engine_log_facts, run_bench
from loraline.settings import Settings
from loraline.workload import random_prompts

# Lines as vLLM 0.24.0 logged them on an H200 (benchmarks/results/gpu-nvidia-h200.json).
VLLM_LOG = """\
(EngineCore pid=817) INFO 11-22 02:35:09 [model_runner.py:302] Model loading took 0.67 GiB and 3.114481 seconds
(EngineCore pid=817) INFO 11-22 02:35:31 [monitor.py:53] torch.compile took 19.59 s in total
(EngineCore pid=817) INFO 11-22 02:35:34 [gpu_worker.py:508] Available KV cache memory: 127.3 GiB
(EngineCore pid=817) INFO 11-22 02:35:34 [kv_cache_utils.py:2146] GPU KV cache size: 3,337,216 tokens
(EngineCore pid=817) INFO 11-22 02:35:34 [kv_cache_utils.py:2147] Maximum concurrency for 8,192 tokens per request: 407.38x
(EngineCore pid=817) INFO 11-22 02:35:38 [model_runner.py:726] Graph capturing finished in 4 secs, took 0.46 GiB
(EngineCore pid=817) INFO 11-22 02:37:14 [core.py:337] init engine (profile, create kv cache, warmup model) took 123.32 s (compilation: 19.59 s)
"""


def test_engine_log_facts_reads_vllms_memory_and_startup_report() -> None:
    assert engine_log_facts(VLLM_LOG) == {
        "model_loading": {"gib": 0.67, "seconds": 3.114481},
        "torch_compile": {"seconds": 19.59},
        "kv_cache_memory": {"gib": 127.3},
        "kv_cache_size": {"tokens": 3337216.0},
        "max_concurrency": {"tokens": 8192.0, "x": 407.38},
        "cuda_graphs": {"seconds": 4.0, "gib": 0.46},
        "init_engine": {"seconds": 123.32},
    }
    assert engine_log_facts("nothing vLLM said") == {}


def test_run_bench_refuses_uneven_repeats_before_starting_an_engine(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    uneven = {"name": "w", "output_len": 4, "prompt_sets": [[[5, 6]], [[7, 8], [9, 10]]]}
    with pytest.raises(EngineError, match="same, non-zero number of prompts"):
        run_bench(model, Settings(vllm_python=None), workloads=[uneven])


@pytest.mark.slow
def test_run_bench_times_every_repeat_and_single_stream_with_runtime_lora(
    vllm_python: Path, settings: Settings, tmp_path: Path
) -> None:
    from loraline.tiny_models import build_llama, build_lora, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    base = build_llama(tmp_path / "base", tokenizer=tok)
    adapter = build_lora(base, tmp_path / "adapter", r=8)
    vocab, n_in, n_out = len(tok), 12, 6
    workloads = [
        {
            "name": "4",
            "output_len": n_out,
            "warmup_prompts": random_prompts(vocab, 4, n_in, seed=1),
            "prompt_sets": [random_prompts(vocab, 4, n_in, seed=s) for s in (2, 3)],
        }
    ]
    single = {"output_len": n_out, "prompts": random_prompts(vocab, 4, n_in, seed=4)}
    r = run_bench(base, settings, workloads=workloads, single_stream=single, lora=("bench", adapter, 8),
                  sampling={"detokenize": False})

    assert r["vllm_version"] and r["device"] == "cpu" and r["timings"]["engine_start_s"] > 0
    assert r["config"]["max_lora_rank"] == 8 and r["config"]["max_loras"] == 1
    assert "init engine" in r["log"] and "init_engine" in r["log_facts"]
    (w,) = r["workloads"]
    assert (w["name"], w["requests"], w["output_len"], len(w["repeats"])) == ("4", 4, n_out, 2)
    for rep in w["repeats"]:
        assert rep["short_outputs"] == 0 and rep["output_tokens"] == 4 * n_out
        assert rep["output_tok_s"] == pytest.approx(4 * n_out / rep["elapsed_s"], rel=1e-3)
    ss = r["single_stream"]
    assert ss["short_outputs"] == 0 and len(ss["ttft_ms"]) == len(ss["e2e_ms"]) == len(ss["tpot_ms"]) == 2
    for ttft, e2e, tpot in zip(ss["ttft_ms"], ss["e2e_ms"], ss["tpot_ms"]):
        assert ttft > 0 and e2e > 0 and tpot == pytest.approx((e2e - ttft) / (n_out - 1), abs=1e-3)


def _benchmark_module(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_kernel_tuning_takes_its_shapes_from_the_model_and_adapter_configs(tmp_path: Path) -> None:
    """benchmarks/lora_kernel_tune.py (GPU only) tunes the shapes vLLM runs: read from config.json (GQA, an explicit
    head_dim) and adapter_config.json (rank, which projections), never assumed."""
    import json

    lora_shapes = _benchmark_module("lora_kernel_tune").lora_shapes
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir(), adapter.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
                                                   "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 4}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 32, "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    rank, layers = lora_shapes(model, adapter)
    assert rank == 32
    # q is heads x head_dim (2048, not the hidden size), k and v the 2 KV heads; o and gate_up are not adapted.
    assert layers == [{"name": "qkv_proj", "k": 1024, "slices": [2048, 256, 256]},
                      {"name": "down_proj", "k": 2816, "slices": [1024]}]
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": "all-linear"}))
    assert [x["name"] for x in lora_shapes(model, adapter)[1]] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_lora_gap_probe_reads_gpu_time_from_a_torch_profiler_trace(tmp_path: Path) -> None:
    """benchmarks/lora_gap_probe.py's trace summary: GPU kernels, memcpy and memset summed (CPU ops not), the LoRA
    kernels apart, the span they cover, per step."""
    import gzip
    import json

    trace_summary = _benchmark_module("lora_gap_probe").trace_summary
    events = [{"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "ts": 1000, "dur": 300},
              {"ph": "X", "cat": "kernel", "name": "_lora_shrink_kernel", "ts": 1300, "dur": 100},
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 1900, "dur": 100},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000}]
    with gzip.open(tmp_path / "rank0.1.pt.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace_summary(tmp_path, iterations=2)
    assert s["span_ms"] == 1.0 and s["gpu_busy_ms"] == 0.5 and s["gpu_busy_share"] == 0.5
    assert s["lora_kernels_ms"] == 0.1 and s["per_step_ms"] == {"wall": 0.5, "gpu_busy": 0.25, "lora_kernels": 0.05}
    assert trace_summary(tmp_path / "nothing", iterations=2)["error"].startswith("no trace under")
