#!/usr/bin/env python3
"""Where runtime LoRA's time goes on the GPU at large batches (issue 16 §2), with vLLM's own torch profiler.

One engine (vLLM's defaults plus ``max_num_seqs`` 512, loraline's CUDA cap), 1,024 random 128-token prompts, 128 out,
``ignore_eos``: output tok/s over ``--repeats`` runs, then one more run with the torch profiler on ``--iterations``
steady decode steps (after ``--delay`` steps). From the trace: GPU kernel time per step (all, and the LoRA kernels'),
and the step's wall time, so the GPU's idle share per step is what the host costs. Prints one JSON line.

Run on the GPU with vLLM importable (benchmarks/GPU.md): ``python3 benchmarks/lora_gap_probe.py --model BASE
[--lora ADAPTER] --out DIR``; set ``VLLM_TUNED_CONFIG_FOLDER`` for tuned LoRA kernels (benchmarks/lora_kernel_tune.py).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import time
from pathlib import Path


def trace_summary(folder: Path, iterations: int) -> dict:
    """GPU kernel time (all, LoRA, memcpy/memset) and the span they cover, from the worker's Chrome trace."""
    files = sorted(p for p in folder.rglob("*.json*") if "trace" in p.name)
    if not files:
        return {"error": f"no trace under {folder}: {[p.name for p in folder.rglob('*')]}"}
    path = max(files, key=lambda p: p.stat().st_size)  # the worker's (GPU) trace, not the front end's
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": f"no GPU events in {path.name}", "categories": sorted({str(e.get('cat')) for e in events})}
    start = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e["dur"] for e in gpu)
    by_name: dict[str, float] = {}
    for e in gpu:
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + e["dur"]
    busy = sum(by_name.values())
    lora = sum(v for k, v in by_name.items() if "lora" in k.lower())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        "trace": path.name, "iterations": iterations, "span_ms": round((end - start) / 1000, 2),
        "gpu_busy_ms": round(busy / 1000, 2), "gpu_busy_share": round(busy / (end - start), 3),
        "lora_kernels_ms": round(lora / 1000, 2),
        "per_step_ms": {"wall": round((end - start) / 1000 / iterations, 3), "gpu_busy": round(busy / 1000 / iterations, 3),
                        "lora_kernels": round(lora / 1000 / iterations, 3)},
        "top_kernels_ms": [[k[:120], round(v / 1000, 2)] for k, v in top],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--lora", type=Path, help="runtime LoRA: the adapter directory (else the model runs as is)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tag", default="")
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--delay", type=int, default=40, help="steps before the profiler records (past the first prefills)")
    p.add_argument("--iterations", type=int, default=20, help="steps the profiler records")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prof_dir = (args.out / f"trace{args.tag}").resolve()
    kwargs = dict(max_num_seqs=args.max_num_seqs)
    if args.profile:
        kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(prof_dir),
                                     "torch_profiler_with_stack": False, "ignore_frontend": True,
                                     "torch_profiler_dump_cuda_time_total": False,
                                     "delay_iterations": args.delay, "max_iterations": args.iterations}
    if args.lora:
        acfg = json.loads((args.lora / "adapter_config.json").read_text())
        kwargs.update(enable_lora=True, max_lora_rank=int(acfg["r"]), max_loras=1)
    t0 = time.perf_counter()
    llm = LLM(model=str(args.model), **kwargs)
    start_s = time.perf_counter() - t0
    lora = LoRARequest("probe", 1, str(args.lora)) if args.lora else None
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    sp = SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True, temperature=0.0,
                        detokenize=False)

    def prompts(seed: int) -> list:
        rng = random.Random(seed)
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab - 1) for _ in range(args.input_len)])
                for _ in range(args.prompts)]

    llm.generate(prompts(1), sp, lora_request=lora, use_tqdm=False)  # warm-up, same batch shapes
    tok_s = []
    for r in range(args.repeats):
        t = time.perf_counter()
        outs = llm.generate(prompts(10 + r), sp, lora_request=lora, use_tqdm=False)
        tok_s.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    result = {"mode": "lora" if lora else "model", "tag": args.tag, "engine_start_s": round(start_s, 1),
              "prompts": args.prompts, "output_tok_s": [round(x) for x in tok_s],
              "tuned_config_folder": os.environ.get("VLLM_TUNED_CONFIG_FOLDER"), "max_num_seqs": args.max_num_seqs}
    if args.profile:
        llm.start_profile()
        llm.generate(prompts(99), sp, lora_request=lora, use_tqdm=False)
        llm.stop_profile()
        time.sleep(5)  # the worker writes the trace after stop
        result["profile"] = trace_summary(prof_dir, args.iterations)
    print("PROBE " + json.dumps(result), flush=True)
    (args.out / f"probe{args.tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
