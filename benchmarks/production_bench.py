"""The production stack's own numbers on this machine (issue 15): `services up --production` cold and warm, `services
down`, flow-run pickup latency (created -> Running) with the workers' 2 s polling, and releases per hour of the tiny
demo model with one worker and with two (benchmark, vLLM parity and image off: the stack's throughput, not the engine's).

    .venv/bin/python benchmarks/production_bench.py --releases 4 --out benchmarks/results/production-cpu.json

Starts everything in a temporary home (one user postgres can enter) and stops it at the end.
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
from datetime import datetime
from pathlib import Path

LORALINE = str(Path(sys.executable).with_name("loraline"))


def services(env: dict[str, str], *args: str) -> tuple[float, dict]:
    t0 = time.monotonic()
    proc = subprocess.run([LORALINE, "services", *args, "--json"], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"loraline services {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0, json.loads(proc.stdout)


def batch(env: dict[str, str], base: Path, adapters: list[Path], name: str) -> tuple[float, list[dict]]:
    """Submit one release per adapter at once; wall time until all finished, and their flow_run records."""
    t0 = time.monotonic()
    procs = [subprocess.Popen([LORALINE, "release", "--adapter", str(a), "--base", str(base), "--name", name, "--submit",
                               "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in adapters]
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            sys.exit(f"a release failed:\n{err[-3000:]}")
        runs.append(json.loads(out)["flow_run"])
    return time.monotonic() - t0, runs


def pickup_seconds(prefect_url: str, run_ids: list[str]) -> list[float]:
    """created -> start_time (Running) of each flow run, from the Prefect API."""
    import httpx

    out = []
    with httpx.Client(base_url=f"{prefect_url}/api", timeout=10) as c:
        for rid in run_ids:
            fr = c.get(f"/flow_runs/{rid}").json()
            created, started = (datetime.fromisoformat(fr[k].replace("Z", "+00:00")) for k in ("created", "start_time"))
            out.append((started - created).total_seconds())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--releases", type=int, default=4, help="releases per batch (distinct adapters)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from loraline.demo import init_tiny_demo
    from loraline.services.work_pool import WORKERS, start_workers, stop_workers
    from loraline.settings import Settings
    from loraline.tiny_models import scaled_adapter

    root = Path(tempfile.mkdtemp(prefix="production-bench-"))
    root.chmod(0o711)
    home = root / "home"
    env = {**os.environ, "LORALINE_HOME": str(home), "LORALINE_BENCH": "false", "LORALINE_VLLM_PARITY": "false",
           "LORALINE_EVAL_EXAMPLES": "4", "LORALINE_IMAGE": "none", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    for var in ("DOCKER_HOST", "LORALINE_DOCKER_HOST", "LORALINE_TRACKING_URI", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(var, None)
    demo = init_tiny_demo(root / "demo", progress=False)
    n = args.releases
    adapters = [scaled_adapter(demo.checkpoint, root / f"adapter-{i}", 1 + 0.01 * i) for i in range(2 * n)]
    result: dict = {"machine": platform.machine(), "cpus": os.cpu_count(), "releases_per_batch": n,
                    "workload": "tiny demo model; LORALINE_BENCH=false, LORALINE_VLLM_PARITY=false, "
                                "LORALINE_EVAL_EXAMPLES=4, LORALINE_IMAGE=none; worker --limit 2, 2 s polling"}
    try:
        result["up_cold_s"], st = services(env, "up", "--production")
        print(f"services up --production (cold): {result['up_cold_s']:.1f} s")
        # One worker: both stopped, the first started again (with this process's environment, as `up` would).
        settings = Settings(home=home)
        stop_workers(settings)
        os.environ.update({k: env[k] for k in ("LORALINE_BENCH", "LORALINE_VLLM_PARITY", "LORALINE_EVAL_EXAMPLES",
                                               "LORALINE_IMAGE")})
        start_workers(settings, st["prefect_url"], names=WORKERS[:1])
        wall1, runs1 = batch(env, demo.base, adapters[:n], "bench-one-worker")
        _, st = services(env, "up")  # the second worker again
        wall2, runs2 = batch(env, demo.base, adapters[n:], "bench-two-workers")
        for label, wall, runs in (("one_worker", wall1, runs1), ("two_workers", wall2, runs2)):
            pick = pickup_seconds(st["prefect_url"], [r["id"] for r in runs])
            result[label] = {"wall_s": round(wall, 1), "releases_per_hour": round(n / wall * 3600, 1),
                             "workers_used": sorted({r["worker"] for r in runs}),
                             "pickup_s": {"median": round(statistics.median(pick), 1), "max": round(max(pick), 1),
                                          "all": [round(p, 1) for p in pick]}}
            print(f"{label}: {n} releases in {wall:.1f} s = {n / wall * 3600:.0f}/h on {result[label]['workers_used']}; "
                  f"pickup median {statistics.median(pick):.1f} s, max {max(pick):.1f} s")
        result["down_s"], _ = services(env, "down")
        print(f"services down: {result['down_s']:.1f} s")
        result["up_warm_s"], _ = services(env, "up")
        print(f"services up (warm, data kept): {result['up_warm_s']:.1f} s")
    finally:
        t0 = time.monotonic()
        subprocess.run([LORALINE, "services", "down"], env=env, capture_output=True, timeout=600)
        result.setdefault("down_after_warm_s", round(time.monotonic() - t0, 1))
        subprocess.run(["rm", "-rf", str(root)])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
