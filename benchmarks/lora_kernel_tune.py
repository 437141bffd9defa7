#!/usr/bin/env python3
"""Tune vLLM's runtime-LoRA Triton kernels (punica shrink x·A and expand ·B) for one model and adapter on this GPU.

Issue 16 §2: runtime LoRA with CUDA graphs on every step still gives about half the merged model's output tok/s at
1,024 prompts, and vLLM logs "Using default LoRA kernel configs". vLLM reads tuned configs from
``VLLM_TUNED_CONFIG_FOLDER`` (vllm/lora/ops/triton_ops/README_TUNING.md): ``<GPU>_SHRINK.json`` and
``<GPU>_EXPAND_TRUE.json``, keyed max_loras → num_slices → m → k → n. This script finds them by grid search:

- The shapes come from the model's ``config.json`` and the adapter's ``adapter_config.json`` (nothing assumed): for a
  Llama-style model with every linear layer adapted, vLLM runs qkv (3 slices: q, k, v), o (1), gate_up (2), down (1).
- Each candidate is timed inside a CUDA graph (``triton.testing.do_bench_cudagraph``), as the engine replays them, for
  every batch size ``--m``; its output is checked against vLLM's default config before it can win.
- Writes the two JSON files to ``--out`` and ``lora-kernel-tune.json`` (default vs best, µs, per shape and m).

Run on the GPU with vLLM importable (benchmarks/GPU.md): ``python3 benchmarks/lora_kernel_tune.py --model BASE
--adapter ADAPTER --out DIR``; then ``VLLM_TUNED_CONFIG_FOLDER=DIR`` for the engine.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

SHRINK_GRID = dict(block_m=[16, 32, 64], block_n=[16, 32], block_k=[32, 64, 128, 256], split_k=[1, 2, 4, 8, 16],
                   num_warps=[4, 8], num_stages=[2, 3])
EXPAND_GRID = dict(block_m=[16, 32, 64, 128], block_n=[32, 64, 128, 256], block_k=[16, 32], num_warps=[4, 8],
                   num_stages=[2, 3])


def log(msg: str) -> None:
    print(f"[lora_kernel_tune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lora_shapes(model: Path, adapter: Path) -> tuple[int, list[dict[str, Any]]]:
    """(rank, the adapted linear layers as vLLM stacks them: name, input size, output slices), from the two configs."""
    cfg = json.loads((model / "config.json").read_text())
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    targets = acfg.get("target_modules") or []
    if isinstance(targets, str):  # "all-linear" (or a regex): every projection below
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layers = []
    if any(p in targets for p in ("q_proj", "k_proj", "v_proj")):  # vLLM's QKVParallelLinear: all three slices
        layers.append({"name": "qkv_proj", "k": hidden, "slices": [heads * head_dim, kv_heads * head_dim,
                                                                   kv_heads * head_dim]})
    if "o_proj" in targets:
        layers.append({"name": "o_proj", "k": heads * head_dim, "slices": [hidden]})
    if "gate_proj" in targets or "up_proj" in targets:
        layers.append({"name": "gate_up_proj", "k": hidden, "slices": [inter, inter]})
    if "down_proj" in targets:
        layers.append({"name": "down_proj", "k": inter, "slices": [hidden]})
    if not layers:
        raise SystemExit(f"{adapter}/adapter_config.json targets {targets}: none of a Llama-style model's projections")
    return int(acfg["r"]), layers


def grid(space: dict[str, list[int]], extra: dict[str, Any], limit: int, seed: int) -> list[dict[str, Any]]:
    keys = list(space)
    combos = [dict(zip(keys, v), **extra) for v in itertools.product(*(space[k] for k in keys))]
    random.Random(seed).shuffle(combos)
    return combos[:limit]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the base model's directory (config.json)")
    p.add_argument("--adapter", type=Path, required=True, help="the LoRA adapter's directory (adapter_config.json)")
    p.add_argument("--out", type=Path, required=True, help="VLLM_TUNED_CONFIG_FOLDER to write")
    p.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256, 512, 2048, 8192])
    p.add_argument("--max-loras", type=int, default=1, help="the engine's max_loras (loraline runs 1)")
    p.add_argument("--limit", type=int, default=60, help="candidates per kernel and shape (a seeded sample of the grid)")
    p.add_argument("--rep-ms", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420, help="wall time for the search, shared evenly by kernel, "
                   "shape and m (compiling the candidates is most of it); what was not tried by then is skipped")
    args = p.parse_args()

    import torch
    import triton.testing
    from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    from vllm.lora.ops.triton_ops.utils import get_lora_op_configs

    rank, layers = lora_shapes(args.model, args.adapter)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("-", "_")
    max_m = max(args.m)
    meta = LoRAKernelMeta.make(args.max_loras, max_m, dev)
    key_loras = str(args.max_loras + 1)  # vLLM keys by lora_ids.size(0): max_loras + 1 ("no LoRA" is one)
    log(f"{gpu}: rank {rank}, layers {[(x['name'], x['k'], x['slices']) for x in layers]}, m {args.m}")

    def run_with(module: Any, cfg: dict[str, Any], fn: Any) -> float:
        """µs per call of fn with the kernel config forced to cfg, replayed in a CUDA graph."""
        saved = module.get_lora_op_configs
        module.get_lora_op_configs = lambda *a, **k: cfg
        try:
            fn()
            torch.cuda.synchronize()
            return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms)
        finally:
            module.get_lora_op_configs = saved

    shrink_json: dict[str, Any] = {key_loras: {}}
    expand_json: dict[str, Any] = {key_loras: {}}
    summary: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    n_cells = 0
    t_start = time.perf_counter()
    for layer in layers:
        k, slices = layer["k"], layer["slices"]
        a = [torch.randn(args.max_loras, 1, rank, k, device=dev, dtype=dtype) * 0.05 for _ in slices]
        b = [torch.randn(args.max_loras, 1, n, rank, device=dev, dtype=dtype) * 0.05 for n in slices]
        for op, module, space, extra in (
                ("shrink", lora_shrink_op, SHRINK_GRID, {"num_ctas": 1, "group_size_m": 8, "max_nreg": None}),
                ("expand", lora_expand_op, EXPAND_GRID, {"num_ctas": 1, "max_nreg": None})):
            kk, nn = (k, rank) if op == "shrink" else (rank, max(slices))
            table = (shrink_json if op == "shrink" else expand_json)[key_loras].setdefault(str(len(slices)), {})
            candidates = grid({**space, "block_n": [x for x in space["block_n"] if op == "expand" or x <= max(16, rank)]},
                              extra, args.limit, seed=len(slices) * 100003 + kk * 7 + nn)
            for m in args.m:
                key = (op, len(slices), kk, nn, m)
                if key in seen:  # o_proj's and down_proj's expand have one key: timed once, counted for both
                    summary.append({**seen[key], "layer": layer["name"]})
                    continue
                x = torch.randn(m, k, device=dev, dtype=dtype)
                shrunk = torch.randn(len(slices), m, rank, device=dev, dtype=torch.float32) * 0.1
                meta.prepare_tensors(torch.zeros(m, dtype=torch.int32, device=dev))  # every token on LoRA 0
                margs = meta.meta_args(m, False)
                if op == "shrink":
                    out = torch.zeros(len(slices), m, rank, device=dev, dtype=torch.float32)

                    def fn(out=out, x=x, margs=margs) -> None:
                        lora_shrink_op._lora_shrink(x, a, out, *margs, 0.5)
                else:  # adds into out on every replay, as the engine adds into the base layer's output
                    out = torch.zeros(m, sum(slices), device=dev, dtype=dtype)

                    def fn(out=out, shrunk=shrunk, margs=margs) -> None:
                        lora_expand_op._lora_expand(shrunk, b, out, *margs, offset_start=0, add_inputs=True)

                def result(module: Any, cfg: dict[str, Any], out=out, fn=fn) -> torch.Tensor:
                    saved = module.get_lora_op_configs
                    module.get_lora_op_configs = lambda *a, **k: cfg
                    try:
                        out.zero_()
                        fn()
                        return out.float().clone()
                    finally:
                        module.get_lora_op_configs = saved

                default = get_lora_op_configs(op, max_loras=args.max_loras + 1, batch=m, hidden_size=kk if op == "shrink"
                                              else nn, rank=nn if op == "shrink" else kk, num_slices=len(slices),
                                              add_inputs=True if op == "expand" else None)
                t_default = run_with(module, default, fn)
                want = result(module, default)
                best, t_best, tried, failed = default, t_default, 0, 0
                n_cells, attempted = n_cells + 1, 0
                deadline = t_start + args.budget_s * n_cells / (2 * len(layers) * len(args.m))
                for cfg in candidates:
                    if time.perf_counter() > deadline:
                        break
                    attempted += 1
                    try:
                        t = run_with(module, cfg, fn)
                        same = torch.allclose(result(module, cfg), want, rtol=2e-2, atol=2e-2)
                    except Exception:  # noqa: BLE001 - a config the GPU cannot run (shared memory, registers)
                        failed += 1
                        continue
                    tried += 1
                    if not same:
                        failed += 1
                        continue
                    if t < t_best:
                        best, t_best = cfg, t
                table.setdefault(str(m), {}).setdefault(str(kk), {})[str(nn)] = best
                row = {"op": op, "layer": layer["name"], "slices": len(slices), "m": m, "k": kk, "n": nn,
                       "default_us": round(t_default, 2), "best_us": round(t_best, 2),
                       "speedup": round(t_default / t_best, 2), "tried": tried, "failed": failed,
                       "not_reached": len(candidates) - attempted, "best": best}
                seen[key] = row
                summary.append(row)
                log(f"{op} {layer['name']} m={m}: default {t_default:.1f} µs, best {t_best:.1f} µs "
                    f"({row['speedup']}x; {tried} run, {failed} refused or wrong, {row['not_reached']} not reached)")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{gpu}_SHRINK.json").write_text(json.dumps(shrink_json, indent=1))
    (args.out / f"{gpu}_EXPAND_TRUE.json").write_text(json.dumps(expand_json, indent=1))
    # Per forward pass at each m: every adapted layer's shrink + expand, times the model's layers.
    layers_n = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    per_step = {str(m): {f"{w}_us": round(layers_n * sum(r[f"{w}_us"] for r in summary if r["m"] == m), 1)
                         for w in ("default", "best")} for m in args.m}
    (args.out / "lora-kernel-tune.json").write_text(json.dumps({
        "gpu": gpu, "rank": rank, "layers": layers, "num_hidden_layers": layers_n, "max_loras": args.max_loras,
        "m": args.m, "seconds": round(time.perf_counter() - t_start, 1), "per_step_lower_bound": per_step,
        "rows": summary}, indent=1))
    log(f"wrote {args.out} in {time.perf_counter() - t_start:.0f} s; per forward pass (shrink + expand, "
        "every layer): " + ", ".join(f"m={m}: {v['default_us'] / 1000:.2f} → {v['best_us'] / 1000:.2f} ms"
                                                           for m, v in per_step.items()))


if __name__ == "__main__":
    main()
