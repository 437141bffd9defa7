"""The GGUF export step of the release flow (after registration and the task evaluation): llama.cpp files of the merged
model, their parity against it and (when the release was evaluated) their task accuracy, recorded on the release.
Wiring only.

A failure (llama.cpp cannot convert the model, f16 parity fails) marks the model version ``loraline.status=failed``
(step ``gguf``, with the reason: no alias moves) and fails the flow, like the other steps after registration. With
``--gguf auto`` (the default) a model llama.cpp's converter does not support is recorded as skipped instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from loraline.benchmark import release_dirs
from loraline.gguf_export import export_gguf
from loraline.records import log_gguf
from loraline.settings import Settings
from loraline_flows.common import artifact_key, failing, progress


@task(name="gguf-export", cache_policy=NO_CACHE, task_run_name="gguf-{name}-v{version}")
def gguf_task(name: str, version: str, run_id: str, merged_dir: Path, merged_sha256: str, types: Sequence[str],
              required: bool, settings: Settings, merged_accuracy: float | None = None) -> dict[str, Any]:
    with failing(name, version, "gguf", settings):
        export = export_gguf(Path(merged_dir), merged_sha256, types, settings, progress=progress("gguf"),
                             skip_unsupported=not required, merged_accuracy=merged_accuracy)
        entries = log_gguf(name, version, run_id, export, settings)
    if entries:
        create_table_artifact(
            key=artifact_key("gguf", name),
            table=[{"quant": e["quant"], "sha256": e["sha256"][:16], "MB": round(e["bytes"] / 1e6, 1),
                    "parity": e["parity"]["verdict"], "identical": e["parity"]["identical"], "close": e["parity"]["close"],
                    "failed": e["parity"]["failed"],
                    "accuracy": None if e["accuracy"] is None else e["accuracy"]["accuracy"],
                    "merged accuracy": None if e["accuracy"] is None else e["accuracy"]["merged_accuracy"],
                    "uri": e["uri"]} for e in entries],
            description=f"GGUF exports of models:/{name}/{version} (llama.cpp), their parity against the merged model "
                        "and their task accuracy (empty: the release ran no task evaluation)")
    return {"gguf": entries, **({"gguf_skipped": export.skipped} if export.skipped else {})}


def gguf_release(lineage: dict[str, Any], types: Sequence[str], required: bool, settings: Settings,
                 base_dir: Path | None = None) -> dict[str, Any]:
    """Export the release ``lineage`` describes as GGUF ``types`` (merged again first if its directory was removed);
    each file is evaluated on the task too when the release was (its ``evaluation`` holds the merged model's accuracy,
    on the same number of questions). A release gated before keeps the types it has; these are added."""
    _adapter_dir, _base_dir, merged_dir = release_dirs(lineage, settings, base_dir)
    evaluation = lineage.get("evaluation") or {}
    merged_accuracy = evaluation.get("accuracy")
    if evaluation.get("examples"):  # the questions the release was evaluated on, whatever this run's settings say
        settings = settings.model_copy(update={"eval_examples": int(evaluation["examples"])})
    recorded = gguf_task(lineage["model_name"], str(lineage["model_version"]), lineage["mlflow_run_id"], merged_dir,
                        lineage["merged"]["sha256"], tuple(types), required, settings,
                        merged_accuracy=None if merged_accuracy is None else float(merged_accuracy))
    return {**lineage, **recorded}
