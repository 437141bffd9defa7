"""The release flow: fetch -> validate -> merge -> parity (HF, then vLLM) -> register -> evaluate -> benchmark -> image ->
smoke -> gate (moves the candidate/champion aliases) -> report.

Wiring only.

Retries only on the network-bound fetches; merge and parity are cached on content digests
(a re-run with unchanged inputs does no merge), and registration is idempotent in MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction, transaction

from loraline.benchmark import release_dirs
from loraline.evaluate import evaluate_release
from loraline.gate import gate_release, undo_gate
from loraline.gguf_export import gguf_required, gguf_types
from loraline.llama_engine import find_llama
from loraline.image import check_gguf_image, image_mode
from loraline.merge import MergedModel, merge_adapter, merge_key, merged_path
from loraline.parity import ParityReport, check_parity, check_vllm_parity, parity_key, parity_prompts, require_parity
from loraline.params import BenchmarkWorkload, GateThresholds, ImageMode
from loraline.records import experiment_of, log_evaluation, log_report, reopen
from loraline.registry import check_model_name, find_release, holding, register_model
from loraline.report import lineage_rows, release_report
from loraline.resume import resume_plan, with_image
from loraline.settings import Settings
from loraline.sources import FetchedAdapter, FetchedBase, fetch_adapter, fetch_base, parse_source
from loraline.validation import ValidationReport, validate_adapter, validation_key
from loraline_flows.benchmark import bench_release
from loraline_flows.common import artifact_key, failing, flow_settings, name_flow_run
from loraline_flows.gguf import gguf_release
from loraline_flows.image import image_release, preflight_task


def _validate_key(_ctx: Any, p: dict[str, Any]) -> str:
    return validation_key(p["adapter"], p["base"], p["settings"])


def _merge_key(_ctx: Any, p: dict[str, Any]) -> str:
    return merge_key(p["adapter"], p["base"], p["settings"])


def _parity_key(_ctx: Any, p: dict[str, Any]) -> str:
    return parity_key(p["adapter"].sha256, p["base"].sha256, p["merged"].sha256, p["settings"])


def _retried_if_remote(fetch: Any, source: str) -> Any:
    """``fetch`` as is for a remote source (hf://, MLflow, s3://: retried), without retries for a local one (a directory, an
    archive, a .gguf file): missing or bad, it does not get better by waiting (the retries cost 42 s before the error)."""
    return fetch.with_options(retries=0) if parse_source(source).kind == "local" else fetch


@task(name="fetch-adapter", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def fetch_adapter_task(source: str, settings: Settings) -> FetchedAdapter:
    return fetch_adapter(source, settings)


@task(name="fetch-base", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def fetch_base_task(source: str, settings: Settings) -> FetchedBase:
    return fetch_base(source, settings)


@task(name="validate", cache_key_fn=_validate_key)
def validate_task(adapter: FetchedAdapter, base: FetchedBase, settings: Settings) -> ValidationReport:
    return validate_adapter(adapter, base, settings)


@task(name="find-release", cache_policy=NO_CACHE)
def find_release_task(name: str, adapter: FetchedAdapter, base: FetchedBase, settings: Settings) -> dict[str, Any] | None:
    return find_release(name, adapter, base, settings, progress=get_run_logger().info)


@task(name="merge", cache_key_fn=_merge_key)
def merge_task(adapter: FetchedAdapter, base: FetchedBase, settings: Settings) -> MergedModel:
    return merge_adapter(adapter, base, settings)


@task(name="parity", cache_key_fn=_parity_key)
def parity_task(adapter: FetchedAdapter, base: FetchedBase, merged: MergedModel, settings: Settings) -> ParityReport:
    report = check_parity(adapter.path, base.path, merged.path, parity_prompts(merged.path, settings), settings)
    return require_parity(report)


@task(name="vllm-parity", cache_key_fn=lambda ctx, p: "vllm-" + _parity_key(ctx, p))
def vllm_parity_task(adapter: FetchedAdapter, base: FetchedBase, merged: MergedModel, validation: ValidationReport,
                     settings: Settings) -> tuple[ParityReport, ...]:
    reports = check_vllm_parity(adapter.path, base.path, merged.path, parity_prompts(merged.path, settings), settings,
                                runtime_lora=validation.runtime_lora_servable)
    return tuple(require_parity(r) for r in reports)


@task(name="register", cache_policy=NO_CACHE, task_run_name="register-{name}")
def register_task(name: str, adapter: FetchedAdapter, base: FetchedBase, validation: ValidationReport,
                  merged: MergedModel, parity: ParityReport, vllm_parity: tuple[ParityReport, ...], settings: Settings) -> dict[str, Any]:
    return register_model(name, adapter, base, validation, merged, parity, settings, vllm_parity,
                          progress=get_run_logger().info)


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate-{lineage[model_name]}-v{lineage[model_version]}")
def evaluate_task(lineage: dict[str, Any], base_dir: Path, settings: Settings) -> dict[str, Any]:
    name, version, run_id = lineage["model_name"], str(lineage["model_version"]), lineage["mlflow_run_id"]
    with failing(name, version, "evaluate", settings):
        _adapter_dir, base_dir, merged_dir = release_dirs(lineage, settings, Path(base_dir))  # merged again if it was removed
        report = evaluate_release(merged_dir, base_dir, settings, base_sha256=lineage["base"]["sha256"])
        summary = log_evaluation(name, version, run_id, report, settings)
    get_run_logger().info("task accuracy %.1f%% (base %.1f%%) on %d questions", 100 * report.merged.accuracy,
                          100 * report.base.accuracy, report.merged.examples)
    return {**lineage, "evaluation": summary}


@task(name="gate", cache_policy=NO_CACHE, task_run_name="gate-{lineage[model_name]}-v{lineage[model_version]}")
def gate_task(lineage: dict[str, Any], thresholds: GateThresholds, settings: Settings) -> dict[str, Any]:
    reopen(lineage["model_name"], str(lineage["model_version"]), "report", settings)  # its report failed last time: redone now
    decision = gate_release(lineage, thresholds, settings)
    verdict = "passed" if decision.passed else "failed: " + "; ".join(decision.reasons)
    get_run_logger().info("gate %s; aliases moved: %s", verdict, decision.aliases_moved or "none")
    txn = get_transaction()
    if txn is not None:  # for the rollback hook: what to put back if a later step of the release fails
        txn.set("gate", decision.to_dict())
        txn.set("settings", settings)
    return decision.to_dict()


@gate_task.on_rollback
def _undo_gate(txn: Transaction) -> None:
    """A step after the gate failed: the aliases the gate moved go back (nothing half-released stays named)."""
    logger = get_run_logger()
    decision, settings = txn.get("gate", None), txn.get("settings", None)
    if not decision or not decision.get("aliases_moved"):
        return
    try:
        restored = undo_gate(decision, "a step after the gate failed (see the release's flow run)", settings)
        logger.warning("rolled back the gate of models:/%s/%s: %s", decision["model_name"], decision["model_version"],
                       ", ".join(f"{a} -> {('v' + v) if v else 'unset'}" for a, v in restored.items()) or "nothing to restore")
    except Exception as e:  # noqa: BLE001 - logged; the step's own error fails the flow
        logger.error("could not roll back the gate of models:/%s/%s (%s): check its aliases in the MLflow UI",
                     decision["model_name"], decision["model_version"], e)


@task(name="report", cache_policy=NO_CACHE, task_run_name="report-{lineage[model_name]}-v{lineage[model_version]}")
def report_task(lineage: dict[str, Any], gate: dict[str, Any] | None, settings: Settings) -> str:
    name, version, run_id = lineage["model_name"], str(lineage["model_version"]), lineage["mlflow_run_id"]
    with failing(name, version, "report", settings):
        markdown = release_report(lineage, gate, experiment_of(run_id, settings))
        log_report(name, version, run_id, markdown, gate, settings)
        create_markdown_artifact(key=artifact_key("release", name), markdown=markdown,
                                 description=f"Release report of models:/{name}/{version}")
        create_table_artifact(key=artifact_key("lineage", name), table=lineage_rows(lineage),
                              description=f"Lineage of models:/{name}/{version}: checkpoint to serving image")
    return markdown


@flow(name="release", flow_run_name="release-{name}", log_prints=True)
def release(adapter: str, base: str, name: str, image: ImageMode | None = None,
            benchmark: BenchmarkWorkload | None = None, gate: GateThresholds | None = None,
            gguf: str | None = None) -> dict[str, Any]:
    """Release a LoRA adapter: fetch, validate, merge, check parity, register in MLflow, benchmark, build and push
    the serving image and smoke-test it; then the gate moves the `candidate`/`champion` aliases and a report is published.

    Args:
        adapter: adapter source: a local dir (a Trainer checkpoint-N/ too), hf://ORG/NAME@REV, an MLflow artifact URI
            (runs:/RUN_ID/PATH, models:/..., mlflow-artifacts:/...), or s3://BUCKET/PREFIX (endpoint and keys: LORALINE_S3_*).
        base: base model source: a local dir, hf://ORG/NAME@REV, s3://BUCKET/PREFIX, or a .gguf file, local or s3://
            (dequantized once into the cache).
        name: the MLflow registered model name (one experiment of the same name holds the runs).
        image: serving image mode: merged (merged weights baked in), lora (base + adapter layers, runtime LoRA), gguf
            (a GGUF export served by llama.cpp's server: LORALINE_IMAGE_GGUF_QUANT, default q8_0) or none; empty: LORALINE_IMAGE (merged when a Docker engine and a registry are configured, e.g. by
            `loraline services up`).
        benchmark: the benchmark workload; empty: LORALINE_BENCH_*.
        gate: what the release must show before the aliases move; empty: the defaults.
        gguf: GGUF files to export with llama.cpp after registration (each checked against the merged model): none,
            auto, or types from f16, q8_0, q4_k_m separated by commas; empty: LORALINE_GGUF (auto: f16,q8_0 when the
            llama.cpp environment is there).
    """
    settings = flow_settings()  # the MLflow server, engine and registry of `loraline services up`, if running
    if image is not None:
        settings = settings.model_copy(update={"image": image})
    if benchmark is not None:
        settings = benchmark.apply(settings)
    thresholds = gate or GateThresholds()
    mode = image_mode(settings)
    check_model_name(name)
    gguf_out = gguf_types(settings, gguf)  # a bad --gguf is refused here, before anything is fetched or merged
    required = gguf_required(settings, gguf)
    if gguf_out:
        find_llama(settings)  # llama.cpp and its converter are there: refuse before any merge when they are not
    check_gguf_image(mode, gguf_out, settings, gguf)  # --image gguf serves an export: refused when none is made
    a = _retried_if_remote(fetch_adapter_task, adapter)(adapter, settings)
    b = _retried_if_remote(fetch_base_task, base)(base, settings)
    v = validate_task(a, b, settings)
    preflight_task(settings, mode, v.runtime_lora_servable)  # engine and registry answer: refuse before any merge
    existing = find_release_task(name, a, b, settings)  # its steps are now this run's, until holding() ends
    if existing is None:
        # A cached merge result is only good while its directory is still on disk.
        m = merge_task.with_options(refresh_cache=not merged_path(a, b, settings).is_dir())(a, b, settings)
        p = parity_task(a, b, m, settings)
        vp = vllm_parity_task(a, b, m, v, settings) if settings.vllm_parity else ()
        result = register_task(name, a, b, v, m, p, vp, settings)
        if result["existing"]:  # another release registered these digests first (and ran its steps): continue that one
            existing = result
    else:  # released before: what its evaluation, benchmark, image, gate or report left undone is done now
        result = existing
    with holding(name, result["model_version"], settings):  # given back when the steps end, done or failed
        plan = resume_plan(existing, settings, mode, gguf_out, required)
        if plan.done:  # released and gated before: a re-run never moves an alias back
            name_flow_run(f"release-{name}-v{result['model_version']}-existing")
            return with_image(result, mode)
        name_flow_run(f"release-{name}-v{result['model_version']}")
        if plan.evaluate:
            result = evaluate_task(result, b.path, settings)
        if plan.gguf:  # a release gated before gets the types asked for now
            result = gguf_release(result, plan.gguf, required, settings, base_dir=b.path)
        if plan.benchmark:
            result = bench_release(result, settings, base_dir=b.path)
        if plan.image:
            result = image_release(result, settings, mode, base_dir=b.path)
        with transaction():  # the gate's alias moves are rolled back if the report fails
            decision = gate_task(result, thresholds, settings)
            report_task(result, decision, settings)
        return {**with_image(result, mode), "gate": decision}

