"""The image steps of a release (build + push, smoke test) and the stand-alone ``image`` flow. Wiring only.

Nothing is tagged on the model version until the image is pushed and its smoke test passed. A
failed build or push marks the version ``loraline.status=failed`` (step ``image``). Push, smoke test
and the MLflow record are one Prefect transaction: if the smoke test (step ``smoke``) or the record
fails, the rollback hook of the push deletes the pushed manifest from the registry. A re-run builds again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction, transaction

from loraline.benchmark import release_dirs
from loraline.engine import vllm_lora_rank
from loraline.evaluate import with_served
from loraline.image import Image, build_image, gguf_choice, preflight
from loraline.oci import delete_manifest
from loraline.records import log_image
from loraline.settings import Settings
from loraline.smoke import smoke_test
from loraline.trace import release_of
from loraline_flows.common import artifact_key, failing, flow_settings, progress


@task(name="image-preflight", cache_policy=NO_CACHE)
def preflight_task(settings: Settings, mode: str, runtime_lora_servable: bool) -> None:
    preflight(settings, mode, runtime_lora_servable)


@task(name="image", cache_policy=NO_CACHE, task_run_name="image-{name}-v{version}-{mode}")
def image_task(name: str, version: str, mode: str, lineage: dict[str, Any], adapter_dir: Path, base_dir: Path,
               merged_dir: Path, settings: Settings) -> Image:
    with failing(name, version, "image", settings):
        img = build_image(lineage, mode, settings, adapter_dir=adapter_dir, base_dir=base_dir, merged_dir=merged_dir,
                          lora_rank=vllm_lora_rank(adapter_dir), progress=progress("image"))
    txn = get_transaction()
    if txn is not None:  # for the rollback hook: the pushed manifest to delete if the smoke test or the record fails
        txn.set("pushed", {"repository": img.repository, "digest": img.digest, "pinned": img.pinned})
        txn.set("settings", settings)
    return img


@image_task.on_rollback
def _unpush(txn: Transaction) -> None:
    """The image was pushed but a later step of the image transaction failed: delete the manifest from the registry,
    so no tag is left that MLflow does not know (nothing half-released to pull)."""
    pushed = txn.get("pushed", None)
    if not pushed:
        return
    logger = get_run_logger()
    settings: Settings = txn.get("settings")
    if delete_manifest(pushed["repository"], pushed["digest"], settings.registry_auth):
        logger.warning("rolled back the push: deleted %s from the registry", pushed["pinned"])
    else:
        logger.error("could not delete %s from the registry: delete it by hand (nothing in MLflow names it)", pushed["pinned"])


@task(name="smoke", cache_policy=NO_CACHE, task_run_name="smoke-{name}-v{version}-{image.mode}")
def smoke_task(name: str, version: str, image: Image, merged_dir: Path, settings: Settings) -> dict[str, Any]:
    with failing(name, version, "smoke", settings):
        return smoke_test(image, merged_dir, settings, progress("smoke"))


@task(name="record-image", cache_policy=NO_CACHE, task_run_name="record-image-{name}-v{version}-{image.mode}")
def record_image_task(name: str, version: str, run_id: str, image: Image, settings: Settings) -> dict[str, Any]:
    with failing(name, version, "image", settings):
        return log_image(name, version, run_id, image.to_dict(), settings)


def image_release(lineage: dict[str, Any], settings: Settings, mode: str, base_dir: Path | None = None) -> dict[str, Any]:
    """Build, push and smoke-test the ``mode`` image of the release ``lineage`` describes; record it."""
    name, version, run_id = lineage["model_name"], str(lineage["model_version"]), lineage["mlflow_run_id"]
    adapter_dir, base_dir, merged_dir = release_dirs(lineage, settings, base_dir)
    with transaction():  # push, smoke test, record in MLflow: if a later one fails, the push is rolled back
        img = image_task(name, version, mode, lineage, adapter_dir, base_dir, merged_dir, settings)
        if settings.image_smoke:
            img = replace(img, smoke=smoke_task(name, version, img, merged_dir, settings))
        entry = record_image_task(name, version, run_id, img, settings)
    smoke = img.smoke or {}
    parity = "; ".join(f"{k}: {v['identical']} identical, {v['close']} close of {v['prompts']}"
                       for k, v in (smoke.get("parity") or {}).items()) or "skipped"
    if smoke.get("chat"):  # a llama.cpp image: its parity is the GGUF export's
        parity = (f"the GGUF export's ({img.labels.get('org.loraline.gguf.quant')}); chat: {smoke['chat']['prompts']} "
                  "greedy answers, streamed = plain")
    run_cmd = (f"docker run -p 8000:8000 -e API_KEY {img.pinned}" if mode == "gguf" else
               f"docker run --gpus all --ipc=host -p 8000:8000 -e VLLM_API_KEY {img.pinned}")
    key_note = ("`API_KEY` (from your environment) guards `/v1`; `/docs` and `/openapi.json` stay open." if mode == "gguf" else
                "`VLLM_API_KEY` (from your environment) guards `/v1`; `/health` and `/metrics` stay open.")
    served = (entry.get("smoke") or {}).get("evaluation")
    served_line = (f"{served['accuracy']:.1%} ({served['correct']} of {served['examples']} questions through the openai client; "
                   f"{served['stream_identical']} of {served['streamed']} streamed answers equal the plain ones)"
                   if served else "not run")
    create_markdown_artifact(
        key=artifact_key("image", name, mode),
        markdown=(f"## Serving image of models:/{name}/{version} ({mode})\n\n"
                  f"```\ndocker pull {img.pinned}\n{run_cmd}\n```\n\n"
                  f"{key_note}\n\n"
                  f"| | |\n|---|---|\n| tag | `{img.ref}` |\n| digest | `{img.digest}` |\n| served model | `{img.served_model_name}` |\n"
                  f"| size | {img.size_bytes / 1e9:.2f} GB ({img.compressed_bytes / 1e9:.2f} GB compressed, {img.layers} layers) |\n"
                  f"| uploaded by this push | {img.pushed_bytes / 1e6:,.1f} MB |\n| build / push | {img.build_seconds:.1f} s / {img.push_seconds:.1f} s |\n"
                  f"| smoke: start to ready | {smoke.get('ready_seconds', 'skipped')} s |\n"
                  f"| smoke: parity | {parity} |\n| smoke: task accuracy served | {served_line} |\n\n"
                  f"MLflow run `{run_id}`; trace: `loraline trace {img.pinned}`.\n"),
        description=f"Serving image of models:/{name}/{version} ({mode})",
    )
    out = {**lineage, "images": [i for i in lineage.get("images", []) if i.get("mode") != mode] + [entry],
           "image": {"ref": img.ref, "digest": img.digest, "mode": mode, "pinned": img.pinned}}
    if served and lineage.get("evaluation") and mode != "gguf":  # as log_image wrote it into lineage.json
        out["evaluation"] = with_served(lineage["evaluation"], served)
    return out


@flow(name="image", flow_run_name="image-{model}-{mode}", log_prints=True)
def image(model: str, mode: Literal["merged", "lora", "gguf"] = "merged") -> dict[str, Any]:
    """Build, push and smoke-test the serving image of an existing release.

    Args:
        model: the release: models:/NAME/VERSION, models:/NAME@ALIAS, or any ref `loraline trace` takes.
        mode: merged (merged weights baked in), lora (base layer + adapter layer, runtime LoRA) or gguf (one of the
            release's GGUF exports, LORALINE_IMAGE_GGUF_QUANT or q8_0, served by llama.cpp).
    """
    settings = flow_settings()
    lineage = release_of(model, settings)
    if mode == "gguf":
        gguf_choice(lineage, settings)  # the release exported one: refused before anything is built when not
    preflight(settings, mode, bool(lineage["lora"]["runtime_lora_servable"]))
    return image_release(lineage, settings, mode)
