"""Merge step time on a ~100M-parameter Llama built locally, against the floor of loading the base
and saving a copy of it; plus the release flow's cold and cached (re-run) times.

    .venv/bin/python benchmarks/merge_bench.py [--repeats 3] [--skip-release] [--json]
    .venv/bin/python benchmarks/merge_bench.py --threading [--repeats 9]   # which threads the direct merge should use

``merge_adapter`` as a release runs it (the direct merge for this plain LoRA) and, for comparison in the same run, with
``LORALINE_MERGE_METHOD=peft`` (peft's merge_and_unload, the merge before the direct path): the floor and the merge
interleaved so drift in machine load hits both alike, the peft merges after them; every merge is checked to give the
same sha256.
Prints a table (with --json: one JSON object with ``floor_s``, ``merge_s``, ``ratio`` and the rest) and writes
benchmarks/results/merge-cpu.json. Run it on an otherwise idle machine.
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

from _common import ROOT, git_sha  # noqa: E402 - benchmarks/ is on sys.path (run as a file)
MODEL = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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

    def merge(i: int, method: str = "auto") -> str:
        m = merge_adapter(a, b, Settings(home=work / f"home-{method}-{i}", merge_method=method))
        assert m.seconds > 0 and m.method == ("direct" if method == "auto" else "peft"), (m.method, m.fallback_reason)
        return m.sha256

    # Warm-up, untimed: the first merge in a process pays ~10 s of importing peft/transformers modules.
    floor(-1)
    digests = {merge(-1), merge(-1, "peft")}
    floors, merges, peft_merges = [], [], []
    for i in range(repeats):  # interleaved so drift in machine load hits both alike
        floors.append(timed(lambda: floor(i)))
        merges.append(timed(lambda: digests.add(merge(i))))
    # The peft path after, not in between (the floor/merge rotation is the one the numbers before the direct merge were
    # measured with): with it in the rotation (1.2 GB of float32 copies and 200 MB written each time) the floor and the
    # direct merge measured 0.21 s and 0.83 s, against 0.11 s and 0.39 s without it a minute earlier.
    for i in range(repeats):
        peft_merges.append(timed(lambda: digests.add(merge(i, "peft"))))
    if len(digests) != 1:
        raise SystemExit(f"the direct and peft merges differ: {sorted(digests)}")
    floor_s, merge_s, peft_s = statistics.median(floors), statistics.median(merges), statistics.median(peft_merges)
    return {
        "model": {**MODEL, "parameters": params, "dtype": "bfloat16", "tie_word_embeddings": True},
        "adapter": {"r": 16, "target_modules": "all-linear"},
        "floor_load_save_s": floors,
        "merge_s": merges,
        "floor_median_s": floor_s,
        "merge_median_s": merge_s,
        "ratio_merge_over_floor": merge_s / floor_s,
        "merge_method": "direct",
        "merged_sha256": digests.pop(),  # the same for the direct and the peft merge
        "peft_merge_s": peft_merges,
        "peft_merge_median_s": peft_s,
        "ratio_peft_merge_over_floor": peft_s / floor_s,
        "torch_threads": torch.get_num_threads(),
    }


WAYS = {"inline": (999, 999), "hasher-thread": (1, 999), "writer-and-hasher-threads": (1, 1)}


def bench_threading(work: Path, repeats: int) -> dict[str, object]:
    """The direct merge run each way (all in the caller's thread; the hash in a thread; writes and hash in threads),
    forced whatever the load, interleaved with the floor; medians. What direct_merge's choice of threads rests on."""
    import loraline.direct_merge as dm
    from loraline.tiny_models import build_llama, build_lora, build_tokenizer
    from loraline.merge import merge_adapter
    from loraline.hf_models import base_dtype_name, load_causal_lm
    from loraline.settings import Settings
    from loraline.sources import fetch_adapter, fetch_base

    base = build_llama(work / "base", tokenizer=build_tokenizer(work / "base"), **MODEL)
    adapter = build_lora(base, work / "adapter", r=16)
    settings = Settings(home=work / "home")
    a, b = fetch_adapter(str(adapter), settings), fetch_base(str(base), settings)
    chosen = dm._HASH_THREAD_CPUS, dm._THREADED_CPUS, dm._cpus

    def merge(way: str, i: int) -> str:
        dm._HASH_THREAD_CPUS, dm._THREADED_CPUS = WAYS[way]
        dm._cpus = lambda: (os.cpu_count() or 1, float(os.cpu_count() or 1))
        try:
            return merge_adapter(a, b, Settings(home=work / f"home-{way}-{i}")).sha256
        finally:
            dm._HASH_THREAD_CPUS, dm._THREADED_CPUS, dm._cpus = chosen

    def floor(i: int) -> None:
        load_causal_lm(base, settings, base_dtype_name(base)).save_pretrained(str(work / f"copy-{i}"), safe_serialization=True)

    floor(-1)
    digests = {merge(w, -1) for w in WAYS}
    times: dict[str, list[float]] = {"floor": [], **{w: [] for w in WAYS}}
    for i in range(repeats):
        times["floor"].append(timed(lambda: floor(i)))
        for w in (list(WAYS) if i % 2 == 0 else list(WAYS)[::-1]):
            times[w].append(timed(lambda: digests.add(merge(w, i))))
    if len(digests) != 1:
        raise SystemExit(f"the ways of merging differ: {sorted(digests)}")
    return {"load_average_after": os.getloadavg(), "runs_s": times,
            "median_s": {k: statistics.median(v) for k, v in times.items()}}


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
    ap.add_argument("--json", action="store_true", help="print one JSON object (floor_s, merge_s, ratio, ...) instead of the table")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "merge-cpu.json")
    ap.add_argument("--threading", action="store_true",
                    help="instead: the direct merge inline, with a hasher thread, and with writer and hasher threads")
    args = ap.parse_args()
    if args.threading:
        with tempfile.TemporaryDirectory() as tmp:
            t = bench_threading(Path(tmp), args.repeats)
        print(f"load average {', '.join(f'{x:.2f}' for x in t['load_average_after'])}, {os.cpu_count()} CPUs")  # type: ignore[union-attr]
        for k, v in t["runs_s"].items():  # type: ignore[union-attr]
            print(f"{k}: median {statistics.median(v):.3f} s  {['%.3f' % x for x in v]}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, object] = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "git_sha": git_sha(),
            "merge": bench_merge(Path(tmp), args.repeats),
        }
        if not args.skip_release:
            result["release"] = bench_release(Path(tmp))
    m = result["merge"]
    # The three figures first (what --json is read for), then everything else.
    result = {"floor_s": m["floor_median_s"], "merge_s": m["merge_median_s"], "ratio": m["ratio_merge_over_floor"], **result}  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model: {m['model']['parameters'] / 1e6:.1f}M parameters, bf16; adapter r=16 on all linear layers")  # type: ignore[index]
    print(f"floor (load base + save copy): median {m['floor_median_s']:.2f} s  {['%.2f' % x for x in m['floor_load_save_s']]}")  # type: ignore[index]
    print(f"merge (direct: read, merge, write + digest, tokenizer): median {m['merge_median_s']:.2f} s  "  # type: ignore[index]
          f"{['%.2f' % x for x in m['merge_s']]}")  # type: ignore[index]
    print(f"merge with peft (LORALINE_MERGE_METHOD=peft): median {m['peft_merge_median_s']:.2f} s  "  # type: ignore[index]
          f"{['%.2f' % x for x in m['peft_merge_s']]}")  # type: ignore[index]
    print(f"ratio merge / floor: {m['ratio_merge_over_floor']:.2f}x (peft: {m['ratio_peft_merge_over_floor']:.2f}x); "  # type: ignore[index]
          f"both merges sha256 {m['merged_sha256'][:16]}…")  # type: ignore[index]
    if "release" in result:
        r = result["release"]
        print(f"release flow on the demo assets: cold {r['cold_release_s']:.1f} s, cached re-run {r['cached_rerun_s']:.1f} s")  # type: ignore[index]
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
