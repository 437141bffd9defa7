"""Merge step time on a ~100M-parameter Llama built locally, against the floor of loading the base
and saving a copy of it; plus the release flow's cold and cached (re-run) times.

    .venv/bin/python benchmarks/merge_bench.py [--repeats 3] [--skip-release]

Prints a table and writes benchmarks/results/merge-cpu.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_merge(work: Path, repeats: int) -> dict[str, object]:
    import torch

    from loraline.tiny_models import build_llama, build_lora, build_tokenizer
    from loraline.merge import merge_adapter
    from loraline.hf_models import base_dtype_name, load_causal_lm
    from loraline.settings import Settings
    from loraline.sources import fetch_adapter, fetch_base

    base = build_llama(work / "base", tokenizer=build_tokenizer(work / "base"), **MODEL)
    adapter = build_lora(base, work / "adapter", r=16)
    settings = Settings(home=work / "home")
    a, b = fetch_adapter(str(adapter), settings), fetch_base(str(base), settings)
    params = sum(p.numel() for p in load_causal_lm(base, settings).parameters())

    def floor(i: int) -> None:
        # In the base's own dtype, as the merge writes it (not the dtype this CPU would compute in).
        load_causal_lm(base, settings, base_dtype_name(base)).save_pretrained(str(work / f"copy-{i}"), safe_serialization=True)

    def merge(i: int) -> None:
        merge_adapter(a, b, Settings(home=work / f"home-{i}"))

    # Warm-up, untimed: the first merge in a process pays ~10 s of importing peft/transformers modules.
    floor(-1)
    merge(-1)
    floors, merges = [], []
    for i in range(repeats):  # interleaved so drift in machine load hits both alike
        floors.append(timed(lambda: floor(i)))
        merges.append(timed(lambda: merge(i)))
    return {
        "model": {**MODEL, "parameters": params, "dtype": "bfloat16", "tie_word_embeddings": True},
        "adapter": {"r": 16, "target_modules": "all-linear"},
        "floor_load_save_s": floors,
        "merge_s": merges,
        "floor_median_s": statistics.median(floors),
        "merge_median_s": statistics.median(merges),
        "ratio_merge_over_floor": statistics.median(merges) / statistics.median(floors),
        "torch_threads": torch.get_num_threads(),
    }


def bench_release(work: Path) -> dict[str, object]:
    from loraline.demo import init_tiny_demo

    demo = init_tiny_demo(work / "demo", progress=False)
    env = {**os.environ, "LORALINE_HOME": str(work / "release-home")}
    # The release as `make demo` runs it: vLLM parity on, through the repo's engine venv.
    env.setdefault("LORALINE_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
    cmd = [str(Path(sys.executable).with_name("loraline")), "release", "--adapter", str(demo.checkpoint), "--base", str(demo.base),
           "--name", "bench", "--json"]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"release failed: {out.stderr.strip()[-2000:]}")
        times.append(time.perf_counter() - t0)
    assert json.loads(out.stdout)["existing"] is True
    return {"cold_release_s": times[0], "cached_rerun_s": times[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-release", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "merge-cpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, object] = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "git_sha": git_sha(),
            "merge": bench_merge(Path(tmp), args.repeats),
        }
        if not args.skip_release:
            result["release"] = bench_release(Path(tmp))
    m = result["merge"]
    print(f"model: {m['model']['parameters'] / 1e6:.1f}M parameters, bf16; adapter r=16 on all linear layers")  # type: ignore[index]
    print(f"floor (load base + save copy): median {m['floor_median_s']:.2f} s  {['%.2f' % x for x in m['floor_load_save_s']]}")  # type: ignore[index]
    print(f"merge (load + peft merge + save + digest): median {m['merge_median_s']:.2f} s  {['%.2f' % x for x in m['merge_s']]}")  # type: ignore[index]
    print(f"ratio merge / floor: {m['ratio_merge_over_floor']:.2f}x")  # type: ignore[index]
    if "release" in result:
        r = result["release"]
        print(f"release flow on the demo assets: cold {r['cold_release_s']:.1f} s, cached re-run {r['cached_rerun_s']:.1f} s")  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
