"""The release flow: fetch -> validate -> merge -> parity (HF, then vLLM) -> register -> benchmark -> image -> smoke.

Wiring only.

Retries only on the network-bound fetches; merge and parity are cached on content digests
(a re-run with unchanged inputs does no merge), and registration is idempotent in MLflow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.benchmark import bench_release
from flows.image import image_release, preflight_task
from loraline.image import image_mode
from loraline.merge import MergedModel, merge_adapter, merged_path
from loraline.parity import ParityReport, check_parity, check_vllm_parity, parity_prompts, require_parity
from loraline.registry import check_model_name, find_release, register_model
from loraline.services import configured
from loraline.settings import Settings
from loraline.sources import FetchedAdapter, FetchedBase, fetch_adapter, fetch_base
from loraline.validation import ValidationReport, validate_adapter


def _digests(parameters: dict[str, Any]) -> str:
    a: FetchedAdapter = parameters["adapter"]
    b: FetchedBase = parameters["base"]
    return f"{a.sha256}-{b.sha256}"


def _validate_key(_ctx: Any, p: dict[str, Any]) -> str:
    s: Settings = p["settings"]
    return f"validate-{_digests(p)}-r{s.max_lora_rank}-trc{int(s.trust_remote_code)}"


def _merge_key(_ctx: Any, p: dict[str, Any]) -> str:
    return f"merge-{_digests(p)}-{p['settings'].merge_dtype}-{p['settings'].merge_compute_dtype}"


def _parity_key(_ctx: Any, p: dict[str, Any]) -> str:
    s: Settings = p["settings"]
    return f"parity-{p['merged'].sha256}-{_digests(p)}-{s.parity_prompts}-{s.parity_max_new_tokens}-{s.parity_top_k}"


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
    return find_release(name, adapter, base, settings)


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


@task(name="register", cache_policy=NO_CACHE)
def register_task(name: str, adapter: FetchedAdapter, base: FetchedBase, validation: ValidationReport,
                  merged: MergedModel, parity: ParityReport, vllm_parity: tuple[ParityReport, ...], settings: Settings) -> dict[str, Any]:
    return register_model(name, adapter, base, validation, merged, parity, settings, vllm_parity)


@flow(name="release", flow_run_name="release-{name}", log_prints=True)
def release(adapter: str, base: str, name: str, image: str | None = None) -> dict[str, Any]:
    """Release a LoRA adapter: fetch, validate, merge, check parity, register in MLflow, benchmark, build and push
    the serving image and smoke-test it.

    Args:
        adapter: adapter source: a local dir (a Trainer checkpoint-N/ too), hf://ORG/NAME@REV, or an MLflow artifact URI.
        base: base model source: a local dir or hf://ORG/NAME@REV.
        name: the MLflow registered model name (one experiment of the same name holds the runs).
        image: serving image mode: merged, lora or none; default LORALINE_IMAGE (auto: merged when a Docker engine and
            a registry are configured, e.g. by `loraline services up`).
    """
    settings = configured(Settings())  # the MLflow server, engine and registry of `loraline services up`, if running
    if image is not None:
        settings = settings.model_copy(update={"image": image})
    mode = image_mode(settings)
    check_model_name(name)
    a = fetch_adapter_task(adapter, settings)
    b = fetch_base_task(base, settings)
    v = validate_task(a, b, settings)
    preflight_task(settings, mode, v.runtime_lora_servable)  # engine and registry answer: refuse before any merge
    existing = find_release_task(name, a, b, settings)
    want_bench = settings.bench and not (existing or {}).get("benchmark")
    want_image = mode != "none" and not any(i.get("mode") == mode for i in (existing or {}).get("images", []))
    if existing is not None and not want_bench and not want_image:
        return _with_image(existing, mode)
    if existing is None:
        # A cached merge result is only good while its directory is still on disk.
        m = merge_task.with_options(refresh_cache=not merged_path(a, b, settings).is_dir())(a, b, settings)
        p = parity_task(a, b, m, settings)
        vp = vllm_parity_task(a, b, m, v, settings) if settings.vllm_parity else ()
        result = register_task(name, a, b, v, m, p, vp, settings)
    else:  # released before, but its benchmark or image did not finish: do that now
        result = existing
    if want_bench:
        result = bench_release(result, settings, base_dir=b.path)
    if want_image:
        result = image_release(result, settings, mode, base_dir=b.path)
    return _with_image(result, mode)


def _with_image(lineage: dict[str, Any], mode: str) -> dict[str, Any]:
    """The summary's ``image`` {ref, digest, mode, pinned}: the image of ``mode`` this release has, if any."""
    img = next((i for i in lineage.get("images", []) if i.get("mode") == mode), None)
    out = dict(lineage)
    if img is not None:
        out["image"] = {k: img[k] for k in ("ref", "digest", "mode", "pinned")}
    return out
