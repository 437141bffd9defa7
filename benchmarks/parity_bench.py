"""vLLM parity's engine runs on the demo's tiny model: before (one engine process per side: merged, then base + runtime
LoRA, as releases did until fast-rerun) against after (both engines in one process, :func:`loraline.parity.check_vllm_parity`),
interleaved, with the outputs compared token for token and logprob for logprob.

    LORALINE_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python benchmarks/parity_bench.py [--repeats 3] [--json]
        [--out benchmarks/results/parity-cpu.json]

The engine probe (`import vllm` once per loraline process, shared with the rest of a release) is timed apart and kept out
of both sides. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _common import git_sha  # noqa: E402 - benchmarks/ is on sys.path (run as a file)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo", type=Path, default=None, help="a `loraline demo init --tiny` directory (default: made in a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    from loraline.demo import init_tiny_demo
    from loraline.engine import find_engine, vllm_lora_rank
    from loraline.hf_models import load_tokenizer
    from loraline.merge import merge_adapter
    from loraline.parity import encode_prompts, parity_prompts, vllm_generations, vllm_generations_of
    from loraline.settings import Settings
    from loraline.sources import fetch_adapter, fetch_base

    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        work = Path(tmp)
        demo = args.demo or work / "demo"
        if args.demo is None:
            init_tiny_demo(demo)
        settings = Settings(home=work / "home")
        a = fetch_adapter(str(demo / "checkpoint-100"), settings)
        b = fetch_base(str(demo / "base"), settings)
        m = merge_adapter(a, b, settings)
        ids = encode_prompts(load_tokenizer(m.path, m.path, settings), parity_prompts(m.path, settings))
        lora = ("adapter", a.path, vllm_lora_rank(a.path))

        t0 = time.perf_counter()
        eng = find_engine(settings)
        probe_s = time.perf_counter() - t0

        def before() -> list:
            return [vllm_generations(m.path, ids, settings)[0], vllm_generations(b.path, ids, settings, lora=lora)[0]]

        def after() -> list:
            return [gens for (gens, _ctx), _s in vllm_generations_of([(m.path, None), (b.path, lora)], ids, settings)]

        times: dict[str, list[float]] = {"before": [], "after": []}
        outputs: dict[str, list] = {"before": [], "after": []}
        for i in range(args.repeats):  # interleaved (and alternating who goes first) so load drift hits both alike
            for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
                t0 = time.perf_counter()
                outputs[side].append((before if side == "before" else after)())
                times[side].append(round(time.perf_counter() - t0, 3))
        reference = outputs["before"][0]
        identical = all(run == reference for side in outputs.values() for run in side)

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "git_sha": git_sha(),
        "vllm_version": eng.vllm_version,
        "device": eng.device,
        "model": "loraline demo init --tiny (2-layer Llama, hidden 128) + its checkpoint-100 LoRA (r 8, all linear)",
        "prompts": len(ids),
        "max_new_tokens": settings.parity_max_new_tokens,
        "probe_s": round(probe_s, 3),
        "before_s": times["before"],
        "after_s": times["after"],
        "before_median_s": statistics.median(times["before"]),
        "after_median_s": statistics.median(times["after"]),
        "saved_median_s": round(statistics.median(times["before"]) - statistics.median(times["after"]), 3),
        "outputs_identical": identical,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(f"vLLM parity engines ({result['prompts']} prompts x {result['max_new_tokens']} tokens, {eng.device}, "
              f"vLLM {eng.vllm_version}; probe {probe_s:.1f} s apart)")
        print(f"  before (two processes): median {result['before_median_s']:.1f} s  runs {times['before']}")
        print(f"  after  (one process):   median {result['after_median_s']:.1f} s  runs {times['after']}")
        print(f"  outputs identical (tokens, logprobs, top-k): {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
