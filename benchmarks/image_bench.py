"""Serving-image numbers on this machine: build time cold and cached, bytes pushed by a second adapter version on the
same base (merged vs runtime-LoRA mode), image sizes, container start-to-ready.

Needs `loraline services up` for LORALINE_HOME (engine, registry, MLflow server) and LORALINE_IMAGE_BASE (e.g. the CPU
base from docker/base-cpu/build.sh). Makes its own demo assets unless --demo DIR (with base/ and checkpoint-100/).

    LORALINE_HOME=... LORALINE_IMAGE_BASE=loraline/vllm-cpu:latest \\
      .venv/bin/python benchmarks/image_bench.py --out benchmarks/results/image-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LORALINE_BENCH", "false")
os.environ.setdefault("LORALINE_VLLM_PARITY", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, help="demo dir with base/ and checkpoint-100/ (default: made in a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/image-cpu.json"))
    args = ap.parse_args()

    from loraline_flows.release import release
    from loraline.cli import quiet_third_parties
    from loraline.demo import init_tiny_demo
    from loraline.engine import vllm_lora_rank
    from loraline.image import LABEL, build_image, docker_client
    from loraline.trace import release_of
    from loraline.benchmark import release_dirs
    from loraline.services import configured, status
    from loraline.settings import Settings
    from loraline.smoke import smoke_test
    from loraline.tiny_models import scaled_adapter

    settings = configured(Settings())
    quiet_third_parties(settings)
    st = status(settings)
    if not (st.docker_host and st.registry):
        sys.exit("run `loraline services up` for this LORALINE_HOME first")
    tmp = Path(tempfile.mkdtemp(prefix="image-bench-"))
    demo = args.demo or init_tiny_demo(tmp / "demo", progress=False).base.parent
    name = f"image-bench-{time.strftime('%H%M%S')}"
    v2_adapter = scaled_adapter(demo / "checkpoint-100", tmp / "checkpoint-200", 1.5)
    for adapter in (demo / "checkpoint-100", v2_adapter):
        release(adapter=str(adapter), base=str(demo / "base"), name=name, image="none")
    lineages = [release_of(f"models:/{name}/{v}", settings) for v in (1, 2)]

    client = docker_client(settings)
    # Cold: no image built by loraline is left in the engine (so no cached weight layers); the base image stays.
    for img in client.images.list(filters={"label": LABEL + "model.name"}):
        client.images.remove(img.id, force=True)
    client.images.prune(filters={"dangling": True})
    registry_dir = settings.home / "services" / "registry" / "data"
    say = lambda m: print(f"  {m}", file=sys.stderr)  # noqa: E731
    rows: dict[str, dict] = {}
    for mode in ("merged", "lora"):
        r: dict = {}
        for key, lineage in (("v1_cold", lineages[0]), ("v1_cached", lineages[0]), ("v2", lineages[1])):
            a, b, m = release_dirs(lineage, settings)
            before = du(registry_dir)
            print(f"{mode} {key}: build + push", file=sys.stderr)
            img = build_image(lineage, mode, settings, adapter_dir=a, base_dir=b, merged_dir=m, lora_rank=vllm_lora_rank(a),
                              progress=say)
            r[key] = {"build_seconds": round(img.build_seconds, 2), "push_seconds": round(img.push_seconds, 2),
                      "pushed_bytes": img.pushed_bytes, "registry_growth_bytes": du(registry_dir) - before,
                      "size_bytes": img.size_bytes, "compressed_bytes": img.compressed_bytes, "layers": img.layers,
                      "pinned": img.pinned}
            if key == "v1_cold":
                print(f"{mode}: smoke test (start to ready)", file=sys.stderr)
                smoke = smoke_test(img, m, settings, say)
                r["smoke"] = {"ready_seconds": smoke["ready_seconds"], "pull_seconds": smoke["pull_seconds"],
                              "parity": smoke["parity"]}
        rows[mode] = r
    base_size = client.images.get(settings.image_base).attrs["Size"]
    client.close()
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "base_image": settings.image_base, "base_image_bytes": base_size,
        "adapter_bytes": sum(f.stat().st_size for f in (demo / "checkpoint-100").glob("adapter_*")),
        "merged_bytes": lineages[0]["merged"]["bytes"],
        "modes": rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "docker": subprocess.run(["dockerd", "--version"], capture_output=True, text=True).stdout.strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nbase image {settings.image_base}: {base_size / 1e9:.2f} GB; adapter {out['adapter_bytes'] / 1e3:.0f} kB; "
          f"merged model {out['merged_bytes'] / 1e6:.2f} MB")
    print(f"{'mode':8} {'build cold':>11} {'build cached':>13} {'push v1':>9} {'v2 pushed':>12} {'image size':>11} {'ready':>7}")
    for mode, r in rows.items():
        print(f"{mode:8} {r['v1_cold']['build_seconds']:>9.1f} s {r['v1_cached']['build_seconds']:>11.1f} s "
              f"{r['v1_cold']['push_seconds']:>7.1f} s {r['v2']['pushed_bytes'] / 1e3:>9.1f} kB "
              f"{r['v1_cold']['size_bytes'] / 1e9:>8.2f} GB {r['smoke']['ready_seconds']:>5.1f} s")
    print(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
