"""The benchmark step (a task of the release flow) and the stand-alone ``benchmark`` flow. Wiring only.

A benchmark that fails after registration marks the model version ``loraline.status=failed``
(with the step and reason) and fails the flow; a re-run of the release benchmarks it again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from loraline.benchmark import release_dirs, run_benchmark
from loraline.llama_bench import gguf_targets
from loraline.params import BenchmarkWorkload
from loraline.plots import write_plots
from loraline.records import log_benchmark
from loraline.settings import Settings
from loraline.trace import release_of
from loraline_flows.common import artifact_key, failing, flow_settings, progress


@task(name="benchmark", cache_policy=NO_CACHE, task_run_name="benchmark-{name}-v{version}")
def benchmark_task(name: str, version: str, run_id: str, adapter_dir: Path, base_dir: Path, merged_dir: Path,
                   runtime_lora: bool, lora_params: int, settings: Settings, gguf: tuple[Any, ...] = (),
                   gguf_notes: tuple[str, ...] = ()) -> dict[str, Any]:
    logger = get_run_logger()
    with failing(name, version, "benchmark", settings):
        report = run_benchmark(Path(adapter_dir), Path(base_dir), Path(merged_dir), settings, runtime_lora=runtime_lora,
                               served_name=name, lora_params=lora_params, progress=progress("bench"), gguf=gguf,
                               gguf_notes=gguf_notes)
        with tempfile.TemporaryDirectory() as tmp:
            summary = log_benchmark(name, version, run_id, report, write_plots(report, Path(tmp)), settings)
    links = (f"\nMLflow run `{run_id}` (plots under `benchmark/`), model version `models:/{name}/{version}`; "
             f"trace: `loraline trace models:/{name}/{version}`.\n")
    create_markdown_artifact(key=artifact_key("benchmark", name), markdown=report.markdown() + links,
                             description=f"Benchmark of models:/{name}/{version}")
    create_table_artifact(
        key=artifact_key("benchmark-table", name),
        table=[{"path": r.path, "concurrency": r.concurrency if r.concurrency is not None else "all",
                "output_tok_s": round(r.output_tok_s, 1), "requests_s": round(r.requests_s, 3),
                "ttft_p50_ms": None if r.ttft_ms is None else round(r.ttft_ms.p50, 2),
                "tpot_p50_ms": None if r.tpot_ms is None else round(r.tpot_ms.p50, 3)} for r in report.results],
        description=f"Benchmark of models:/{name}/{version}: output tokens/s and latency by path",
    )
    logger.info("recommended deploy mode: %s (%s)", report.recommendation.mode, report.recommendation.reason)
    if report.cpu is not None:
        create_markdown_artifact(key=artifact_key("cpu-serving", name), markdown=report.cpu_markdown(),
                                 description=f"vLLM-CPU vs llama.cpp on models:/{name}/{version}")
        logger.info("CPU deployment: %s %s (%s)", report.cpu.engine, report.cpu.quant, report.cpu.reason)
    return summary


def bench_release(lineage: dict[str, Any], settings: Settings, base_dir: Path | None = None) -> dict[str, Any]:
    """Benchmark the release ``lineage`` describes; the base is fetched again from its source if no dir is given. Its
    GGUF files (lineage ``gguf``), where on this machine, are served by llama.cpp beside vLLM-CPU."""
    adapter_dir, base_dir, merged_dir = release_dirs(lineage, settings, base_dir)
    lora = lineage["lora"]
    gguf, notes = gguf_targets(lineage.get("gguf") or [], settings.gguf_dir, lineage["merged"]["sha256"])
    summary = benchmark_task(lineage["model_name"], str(lineage["model_version"]), lineage["mlflow_run_id"],
                             adapter_dir, base_dir, merged_dir, bool(lora["runtime_lora_servable"]),
                             int(lora.get("parameters") or 0), settings, tuple(gguf), tuple(notes))
    return {**lineage, "benchmark": summary}


@flow(name="benchmark", flow_run_name="benchmark-{model}", log_prints=True)
def benchmark(model: str, workload: BenchmarkWorkload | None = None) -> dict[str, Any]:
    """Benchmark an existing release again: HF vs vLLM, merged vs runtime LoRA, logged to its MLflow run.

    Args:
        model: the release: models:/NAME/VERSION, models:/NAME@ALIAS, or any ref `loraline trace` takes (its newest release).
        workload: lengths, prompts, repeats and concurrency levels; default LORALINE_BENCH_*.
    """
    settings = flow_settings()
    if workload is not None:
        settings = workload.apply(settings)
    return bench_release(release_of(model, settings), settings)
