"""The deployments users start from the Prefect UI, served by one runner process. Wiring only.

``python -m loraline_flows.serve`` (what ``loraline services up`` starts, with PREFECT_API_URL pointing at its
Prefect server) creates or updates five deployments and executes their runs until stopped:

- ``release/release``: the whole release (its form: adapter, base, name, image mode, benchmark workload, gate);
- ``benchmark/benchmark``, ``image/image``, ``trace/trace``: steps users rerun on an existing model version;
- ``watch/watch``: scans a directory or MLflow experiment and releases each new adapter digest; on a schedule
  (every LORALINE_WATCH_INTERVAL_S) when LORALINE_WATCH_DIRECTORY or LORALINE_WATCH_EXPERIMENT is set.

Defaults come from the settings (LORALINE_ADAPTER, LORALINE_BASE, LORALINE_MODEL_NAME, LORALINE_BENCH_*,
LORALINE_WATCH_*), else from the demo that ``make demo`` writes under <home>/demo. Production servers use
prefect.yaml (a process or Kubernetes work pool with GPUs) instead of this runner: see README.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.deployments.runner import EntrypointType

from loraline.params import BenchmarkWorkload, GateThresholds
from loraline.settings import Settings
from loraline_flows.benchmark import benchmark
from loraline_flows.image import image
from loraline_flows.release import release
from loraline_flows.trace import trace
from loraline_flows.watch import watch

TAGS = ["loraline"]


def release_defaults(settings: Settings) -> dict[str, Any]:
    """The release form's defaults: the configured (or demo) adapter and base, the workload, the gate."""
    demo = settings.home / "demo"
    adapter = settings.adapter or (str(demo / "checkpoint-100") if (demo / "checkpoint-100").is_dir() else None)
    base = settings.base or (str(demo / "base") if (demo / "base").is_dir() else None)
    params: dict[str, Any] = {"name": settings.model_name, "image": None if settings.image == "auto" else settings.image,
                              "benchmark": BenchmarkWorkload.from_settings(settings).model_dump(),
                              "gate": GateThresholds().model_dump()}
    if adapter:
        params["adapter"] = adapter
    if base:
        params["base"] = base
    return params


def deployments(settings: Settings) -> list[Any]:
    common = {"tags": TAGS, "entrypoint_type": EntrypointType.MODULE_PATH}
    rel = release_defaults(settings)
    # Scheduled only when there is something to watch and a base to release on (else a run would fail every interval).
    watched = bool((settings.watch_directory or settings.watch_experiment) and rel.get("base"))
    watch_params = {k: v for k, v in {"base": rel.get("base"), "name": settings.model_name, "directory": settings.watch_directory,
                                      "experiment": settings.watch_experiment, "image": rel["image"],
                                      "benchmark": rel["benchmark"]}.items() if v is not None}
    return [
        release.to_deployment("release", parameters=rel, description="Release a LoRA adapter to a vLLM serving image, traced in MLflow.", **common),
        benchmark.to_deployment("benchmark", parameters={"model": f"models:/{settings.model_name}@champion"},
                                description="Benchmark an existing model version again (HF vs vLLM, merged vs runtime LoRA).", **common),
        image.to_deployment("image", parameters={"model": f"models:/{settings.model_name}@champion", "mode": "merged"},
                            description="Build, push and smoke-test the serving image of an existing model version.", **common),
        trace.to_deployment("trace", parameters={"ref": f"models:/{settings.model_name}@champion"},
                            description="Trace a release from any end: model version, adapter, digest or image.", **common),
        watch.to_deployment("watch", parameters=watch_params,
                            interval=timedelta(seconds=settings.watch_interval_s) if watched else None,
                            concurrency_limit=1,
                            description="Release every adapter newly written to a directory or logged to an MLflow experiment.",
                            **common),
    ]


def main() -> None:
    from prefect import serve

    settings = Settings()
    Path(settings.home).mkdir(parents=True, exist_ok=True)
    serve(*deployments(settings), limit=settings.serve_limit, pause_on_shutdown=False, print_starting_message=True)


if __name__ == "__main__":
    main()
