"""A re-run of an unchanged release, timed as a user runs it: `loraline release ...` from a plain shell, on the demo's
tiny model. Before: the Prefect flow's re-run (`--no-cache`: ephemeral API server, flow and task runs, find-release);
after: the CLI's cached answer from MLflow (no flow run). Interleaved; the two answers are compared.

    .venv/bin/python benchmarks/rerun_bench.py [--repeats 5] [--json] [--out benchmarks/results/rerun-cpu.json]

It makes a fresh LORALINE_HOME (deleted at the end; --home DIR keeps one), the tiny demo (`loraline demo init --tiny`)
and one release of it (`--image none`; LORALINE_BENCH=false and LORALINE_VLLM_PARITY=false unless set: the first
release is set-up, not measured), then times the re-runs. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import git_sha  # noqa: E402 - benchmarks/ is on sys.path (run as a file)
LORALINE = Path(sys.executable).with_name("loraline")


def loraline(args: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    """Run `loraline ARGS` as a user would: ``(wall seconds, stdout, stderr)``; a failure stops the benchmark."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(LORALINE), *args], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"loraline {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout, proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--home", type=Path, default=None, help="LORALINE_HOME to use and keep (default: a temp dir, deleted)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="rerun-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # the embedded (ephemeral) Prefect
    env.update(LORALINE_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    env.setdefault("LORALINE_BENCH", "false")
    env.setdefault("LORALINE_VLLM_PARITY", "false")
    try:
        demo = home / "demo"
        if not (demo / "checkpoint-100" / "adapter_config.json").is_file():
            loraline(["demo", "init", str(demo), "--tiny"], env)
        release = ["release", "--adapter", str(demo / "checkpoint-100"), "--base", str(demo / "base"), "--name", "rerun-bench",
                   "--image", "none", "--json"]
        first_s, first_out, _ = loraline(release, env)
        first = json.loads(first_out)

        times: dict[str, list[float]] = {"before": [], "after": []}
        answers: dict[str, list[dict]] = {"before": [], "after": []}
        notes: list[str] = []
        for i in range(args.repeats):  # interleaved, alternating who goes first, so load drift hits both alike
            for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
                seconds, out, err = loraline(release + (["--no-cache"] if side == "before" else []), env)
                times[side].append(round(seconds, 3))
                answers[side].append(json.loads(out))
                if side == "after":
                    notes.append(err.strip().splitlines()[-1] if err.strip() else "")
        before = answers["before"][0]
        same = (all(a == before for a in answers["before"])
                and all(a == {**before, "cached": True} for a in answers["after"]))
        first_keys = {k: v for k, v in first.items() if k not in ("existing",)}
        rerun_keys = {k: v for k, v in before.items() if k not in ("existing", "status", "failed_step")}
    finally:
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "git_sha": git_sha(),
        "command": "loraline " + " ".join(release[:1] + ["--adapter", "DEMO/checkpoint-100", "--base", "DEMO/base",
                                                         "--name", "rerun-bench", "--image", "none", "--json"]),
        "env": {k: env[k] for k in ("LORALINE_BENCH", "LORALINE_VLLM_PARITY")},
        "first_release_s": round(first_s, 3),
        "before_s": times["before"],
        "after_s": times["after"],
        "before_median_s": statistics.median(times["before"]),
        "after_median_s": statistics.median(times["after"]),
        "after_is_before_plus_cached": same,
        "rerun_matches_first_release": rerun_keys == first_keys,
        "after_stderr": notes[0] if notes else "",
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(f"re-run of an unchanged release ({result['command']}; first release {first_s:.1f} s)")
        print(f"  before (--no-cache: the Prefect flow): median {result['before_median_s']:.2f} s  runs {times['before']}")
        print(f"  after  (cached answer from MLflow):    median {result['after_median_s']:.2f} s  runs {times['after']}")
        print(f"  after == before + cached: {same}; re-run == first release's lineage: {result['rerun_matches_first_release']}")
    return 0 if same and result["rerun_matches_first_release"] else 1


if __name__ == "__main__":
    sys.exit(main())
