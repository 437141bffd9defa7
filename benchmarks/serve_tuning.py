"""Serve faster than vLLM's defaults (issue 16 §2): served output tok/s of candidate server settings against vLLM's
default server, measured with vLLM's own client (``vllm bench serve``), interleaved, with repeats.

Model: the SmolLM2-360M architecture with random bf16 weights and a merged random rank-16 LoRA, as
benchmarks/gpu_bench.py builds it (its ``build`` phase; kept under ``--work``). Workload: random prompts of 128
tokens, 128 out with ``--ignore-eos``, 32 prompts at concurrency 1 and 1,024 at 32 and 256 (``--prompts``).

Protocol: every candidate server is started once, one after the other (vLLM measures its own memory at start, so
starts do not overlap), with the same ``--gpu-memory-utilization`` and ``--max-model-len``; then, per repeat and per
level, ``vllm bench serve`` runs against each server in turn (the order rotates every repeat), with the same prompts
(same seed) for every server in that round and fresh ones for the next. One ``vllm bench serve`` process does a
whole repeat (loraline.engine.run_serve_bench). Medians over repeats are reported with every run kept.

Also recorded per server: vLLM's start-up report ("GPU KV cache size", "Maximum concurrency") next to
``loraline plan`` for the same device and flags (issue 16 §1's check on a GPU).

    export PYTHONPATH=/tmp/site:src:. LORALINE_VLLM_PYTHON=python3
    python3 benchmarks/serve_tuning.py --settings vllm-default,serve-api4,serve-api8 --repeats 2 --git-sha SHA

Writes ``serve-tuning-<device>.json`` (and the servers' logs) to ``--out`` (default ``$OUT``, else
benchmarks/results) after every repeat, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bench  # noqa: E402  (the model build and device helpers)

# name -> (frontend, extra flags). vllm-default is what `python -m vllm.entrypoints.openai.api_server` does unflagged.
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "vllm-default": ("api_server", []),
    "serve-api1": ("serve", ["--api-server-count", "1"]),
    "serve-api2": ("serve", ["--api-server-count", "2"]),
    "serve-api4": ("serve", ["--api-server-count", "4"]),
    "serve-api8": ("serve", ["--api-server-count", "8"]),
    "serve-api4-nostats": ("serve", ["--api-server-count", "4", "--disable-log-stats"]),
    "serve-api4-seqs512": ("serve", ["--api-server-count", "4", "--max-num-seqs", "512"]),
    "serve-api4-tokens16k": ("serve", ["--api-server-count", "4", "--max-num-batched-tokens", "16384"]),
}
log = gpu_bench.log


def bench_argv(url: str, tokenizer: Path, c: int, n: int, seed: int, input_len: int, output_len: int) -> list[str]:
    from loraline.benchmark import crosscheck_argv
    from loraline.workload import Workload

    w = Workload(input_len=input_len, output_len=output_len, concurrency=(c,), server_min_requests=n)
    argv = crosscheck_argv(url, "smol", tokenizer, w, c, seed)
    argv[argv.index("--num-prompts") + 1] = str(n)
    return argv


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tok = [r["output_throughput"] for r in runs]
    ttft = [r["p50_ttft_ms"] for r in runs]
    return {"output_tok_s": statistics.median(tok), "ttft_p50_ms": statistics.median(ttft),
            "tpot_p50_ms": statistics.median(r["p50_tpot_ms"] for r in runs),
            "output_tok_s_runs": [round(x, 1) for x in tok], "ttft_p50_ms_runs": [round(x, 2) for x in ttft],
            "failed": sum(int(r.get("failed") or 0) for r in runs)}


def choose(res: dict[str, Any], baseline: str, top: int, low: int) -> tuple[str, dict[str, Any]]:
    """The candidate with the highest c=top throughput whose c=low TTFT p50 is at most 10% over the baseline's."""
    base = res[baseline]
    why = {}
    best = baseline
    for name, r in res.items():
        if f"c{top}" not in r or f"c{low}" not in r:
            continue
        speed = r[f"c{top}"]["output_tok_s"] / base[f"c{top}"]["output_tok_s"]
        ttft = r[f"c{low}"]["ttft_p50_ms"] / base[f"c{low}"]["ttft_p50_ms"]
        why[name] = {f"c{top}_speedup": round(speed, 3), f"c{low}_ttft_ratio": round(ttft, 3), "ttft_ok": ttft <= 1.10}
        if ttft <= 1.10 and r[f"c{top}"]["output_tok_s"] > res[best][f"c{top}"]["output_tok_s"]:
            best = name
    return best, why


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="vllm-default,serve-api4,serve-api8",
                   help=f"comma-separated, the first is the baseline; known: {', '.join(CANDIDATES)}")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompts", default="1:32,32:1024,256:1024", help="concurrency:prompts per level")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.2, help="each server's (they run side by side)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--work", type=Path, default=Path("/tmp/lbench"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    p.add_argument("--git-sha", default=os.environ.get("GIT_SHA", ""))
    p.add_argument("--engine-timeout-s", type=float, default=560)
    args = p.parse_args()

    from loraline.engine import engine_log_facts, run_serve_bench
    from loraline.plan import plan_kv_cache
    from loraline.server import serve_openai
    from loraline.settings import Settings

    names = args.settings.split(",")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"unknown settings {unknown}: known {list(CANDIDATES)}")
    levels = [tuple(int(x) for x in lv.split(":")) for lv in args.prompts.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.work / "state.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    gpu_bench.phase_build(args.work, state, gpu_bench.MODEL)
    state_path.write_text(json.dumps(state, indent=1))
    merged = Path(state["build"]["merged_dir"])
    dev = gpu_bench.device_info()
    slug = gpu_bench.slug(dev["name"])
    plan_device = next((k for k in ("h200", "h100") if k in slug), None)
    settings = Settings(home=args.work / "home", engine_timeout_s=args.engine_timeout_s)
    common = ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-model-len", str(args.max_model_len)]
    result: dict[str, Any] = {
        "device": dev["name"], "device_info": dev, "git_sha": args.git_sha, "vllm_version": None,
        "model": "SmolLM2-360M architecture (random bf16 weights, merged rank-16 LoRA): " + json.dumps(state["build"]["config"]),
        "workload": {"input_len": args.input_len, "output_len": args.output_len, "ignore_eos": True,
                     "levels": {f"c{c}": {"concurrency": c, "prompts": n} for c, n in levels},
                     "client": "vllm bench serve --dataset-name random --endpoint /v1/completions --request-rate inf",
                     "common_args": common, "repeats": args.repeats,
                     "protocol": "servers started one after another, all up during the measurement; per repeat and "
                                 "level every server in turn (order rotated per repeat), same prompts per round"},
        "baseline": names[0], "default": None, "settings": {}, "servers": {},
    }
    out_path = args.out / f"serve-tuning-{slug}.json"
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}

    with ExitStack() as stack:
        servers = {}
        for name in names:
            frontend, flags = CANDIDATES[name]
            log(f"{name}: starting ({frontend} {' '.join(flags)})")
            s = stack.enter_context(serve_openai(merged, settings, served_model_name="smol", frontend=frontend,
                                                 extra_args=[*common, *flags]))
            facts = engine_log_facts(s.log_path.read_text(errors="replace"))
            info: dict[str, Any] = {"ready_s": s.ready_s, "vllm_report": facts}
            if plan_device:
                plan = plan_kv_cache(merged, settings, device=plan_device, max_model_len=args.max_model_len,
                                     gpu_memory_utilization=args.gpu_memory_utilization, engine="server")
                info["plan"] = {"device": plan_device, "kv_tokens": plan.kv_tokens, "max_concurrency": plan.max_concurrency,
                                "budget_gib": plan.budget_bytes / 2**30}
                if "kv_cache_size" in facts:
                    vt = facts["kv_cache_size"]["tokens"]
                    info["plan"]["vllm_kv_tokens"] = vt
                    info["plan"]["error_pct"] = round(100 * (plan.kv_tokens - vt) / vt, 2)
            result["servers"][name] = info
            servers[name] = s
            log(f"{name}: healthy after {s.ready_s:.0f} s; vLLM {facts.get('kv_cache_size')}, plan {info.get('plan')}")
        for rep in range(args.repeats):
            batch = []
            for li, (c, n) in enumerate(levels):
                seed = 9000 + 100 * rep + li
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    batch.append({"name": f"{name}|c{c}", "argv": bench_argv(servers[name].url, merged, c, n, seed,
                                                                          args.input_len, args.output_len)})
            t0 = time.perf_counter()
            r = run_serve_bench(batch, settings)
            result["vllm_version"] = r["vllm_version"]
            for run in r["runs"]:
                name, lv = run["name"].split("|")
                runs[name].setdefault(lv, []).append(run["result"])
            log(f"repeat {rep + 1}/{args.repeats} in {time.perf_counter() - t0:.0f} s")
            for name in names:
                frontend, flags = CANDIDATES[name]
                result["settings"][name] = {"args": (["vllm serve"] if frontend == "serve" else
                                                     ["python -m vllm.entrypoints.openai.api_server"]) + flags,
                                            **{lv: summarize(rs) for lv, rs in runs[name].items()}}
            top, low = f"c{levels[-1][0]}", f"c{levels[0][0]}"
            result["default"], result["choice"] = choose(result["settings"], names[0], int(top[1:]), int(low[1:]))
            out_path.write_text(json.dumps(result, indent=1))
            print(table(result), flush=True)
        for name, s in servers.items():
            (args.out / f"serve-tuning-{name}.log").write_text(s.log_path.read_text(errors="replace"))
    log(f"wrote {out_path}")
    return 0


def table(result: dict[str, Any]) -> str:
    lvls = list(result["workload"]["levels"])
    head = "| settings | " + " | ".join(f"{lv} out tok/s (runs)" for lv in lvls) + f" | {lvls[0]} TTFT p50 ms |"
    rows = [head, "|" + " --- |" * (len(lvls) + 2)]
    for name, r in result["settings"].items():
        cells = [f"{r[lv]['output_tok_s']:,.0f} ({', '.join(f'{x:,.0f}' for x in r[lv]['output_tok_s_runs'])})"
                 if lv in r else "–" for lv in lvls]
        ttft = r.get(lvls[0], {}).get("ttft_p50_ms")
        mark = " (chosen)" if name == result["default"] else ""
        rows.append(f"| {name}{mark} | " + " | ".join(cells) + f" | {ttft:.1f} |" if ttft else "| – |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
