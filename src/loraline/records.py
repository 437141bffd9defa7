"""What the steps after registration record on a release (through :mod:`loraline.tracking`, the MLflow seam).

Each step on a registered version (evaluate, benchmark, image, smoke, report) runs inside :func:`version_step`: a
failure tags the version ``loraline.status=failed`` with the step and the reason (:func:`mark_failed`; no alias moves
on a failed version), and a later success of that step takes it back (:func:`reopen`, :func:`set_status`). What each
step produced goes on the release's run (metrics, artifacts), its model version (tags, description) and its
``lineage.json``: :func:`log_evaluation`, :func:`log_benchmark`, :func:`log_image`, :func:`log_report`. Registering
the release itself is :mod:`loraline.registry`'s.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from loraline.registry import version_description
from loraline.settings import Settings, redact
from loraline.tracking import TAG, connect


def log_benchmark(name: str, version: str, run_id: str, report: Any, files: Sequence[Path], settings: Settings) -> dict[str, Any]:
    """Attach a :class:`~loraline.benchmark.BenchReport` to a release: metrics and artifacts on its run,
    tags and the recommendation on its model version, a ``benchmark`` section in ``lineage.json``.

    Returns the benchmark summary that went into the lineage.
    """
    from mlflow.entities import Metric

    t = connect(settings)
    client = t.client
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in report.metrics().items()]
    for i in range(0, len(metrics), 900):  # MLflow's batch limit is 1000
        client.log_batch(run_id, metrics=metrics[i:i + 900])
    t.log_texts(run_id, {"benchmark.json": json.dumps(report.to_dict(), indent=2, default=str),
                         "benchmark.md": report.markdown()}, "benchmark", extra=tuple(files))
    summary = {
        "recommendation": report.recommendation.mode,
        "reason": report.recommendation.reason,
        "device": report.device_name,
        "vllm_version": report.vllm_version,
        "seconds": report.seconds,
        "output_tok_s": {r.path + (f"@c{r.concurrency}" if r.concurrency is not None else ""): round(r.output_tok_s, 1)
                         for r in report.results},
        "crosscheck_within_10pct": {c: v["within"] for c, v in (report.crosscheck.get("levels") or {}).items()},
        "artifacts": f"runs:/{run_id}/benchmark",
    }
    cpu = getattr(report, "cpu", None)
    if cpu is not None:
        summary["cpu_recommendation"] = {"engine": cpu.engine, "quant": cpu.quant, "path": cpu.path,
                                         "concurrency": cpu.concurrency, "reason": cpu.reason}
    t.update_lineage(run_id, benchmark=summary)
    released = t.version_tags(name, version).get(f"{TAG}status") == "released"
    tags = {"bench.recommendation": report.recommendation.mode, "bench.device": report.device_name, "bench.run_id": run_id}
    if cpu is not None:
        tags["bench.cpu_recommendation"] = f"{cpu.engine} {cpu.quant}"
    for k, v in tags.items():
        client.set_model_version_tag(name, version, TAG + k, v)
    set_status(client, name, version, "released" if released else "benchmarked")
    client.set_tag(run_id, f"{TAG}bench.recommendation", report.recommendation.mode)
    return summary


def log_evaluation(name: str, version: str, run_id: str, report: Any, settings: Settings) -> dict[str, Any]:
    """Attach a :class:`~loraline.evaluate.EvalReport` to a release: metrics ``eval.*`` and ``evaluation.json`` on its
    run, ``loraline.eval.*`` tags on its model version, an ``evaluation`` section in ``lineage.json``."""
    from mlflow.entities import Metric

    t = connect(settings)
    client = t.client
    summary = report.summary()
    now = int(time.time() * 1000)
    values = {"accuracy": report.merged.accuracy, "base_accuracy": report.base.accuracy, "gain": report.gain,
              "valid_sql": report.merged.valid, "examples": report.merged.examples,
              "seconds": report.merged.seconds + report.base.seconds}
    client.log_batch(run_id, metrics=[Metric(f"eval.{k}", float(v), now, 0) for k, v in values.items()])
    t.log_texts(run_id, {"evaluation.json": json.dumps(report.to_dict(), indent=2)})
    t.update_lineage(run_id, evaluation=summary)
    for k in ("accuracy", "base_accuracy", "gain", "examples"):
        client.set_model_version_tag(name, version, f"{TAG}eval.{k}", str(summary[k]))
    return summary


@contextmanager
def version_step(name: str, version: str, step: str, settings: Settings,
                 warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """A step on a registered version (evaluate, benchmark, image, smoke, report). If it raises, the version is tagged
    ``loraline.status=failed`` with the step and the reason (no alias moves on a failed version) and the error goes on;
    when MLflow cannot take that tag either, ``warn`` says so (the step's own error is the one raised). If it
    succeeds, a failure of this same step left by an earlier run is undone (:func:`reopen`)."""
    try:
        yield
    except Exception as e:
        try:
            mark_failed(name, version, step, str(e), settings)
        except Exception as e2:  # noqa: BLE001 - the step's error is the one raised
            if warn is not None:
                warn(f"could not mark models:/{name}/{version} failed (step {step}): {e2}")
        raise
    reopen(name, version, step, settings)


def mark_failed(name: str, version: str, step: str, reason: str, settings: Settings) -> None:
    """A step after registration failed: say so on the model version (no alias moves on a failed version)."""
    client = connect(settings).client
    status = (client.get_model_version(name, version).tags or {}).get(f"{TAG}status")
    if status and status != "failed":  # what the version was before this failure (reopen() puts it back)
        client.set_model_version_tag(name, version, f"{TAG}failed.previous_status", status)
    client.set_model_version_tag(name, version, f"{TAG}status", "failed")
    client.set_model_version_tag(name, version, f"{TAG}failed.step", step)
    client.set_model_version_tag(name, version, f"{TAG}failed.reason", redact(reason)[:4000])


def reopen(name: str, version: str, step: str, settings: Settings) -> bool:
    """A release re-runs ``step``, the step that failed last time (e.g. ``report``): the version gets back the status it
    had before that failure and loses the failure tags. Returns whether it was failed at ``step``."""
    client = connect(settings).client
    tags = client.get_model_version(name, version).tags or {}
    if tags.get(f"{TAG}status") != "failed" or tags.get(f"{TAG}failed.step") != step:
        return False
    set_status(client, name, version, tags.get(f"{TAG}failed.previous_status") or "registered")
    return True


def set_status(client: Any, name: str, version: str, status: str) -> None:
    """The one way a version leaves ``failed`` (or moves on): ``loraline.status=STATUS``, and the failure tags an
    earlier run left are dropped (the step that failed has now succeeded)."""
    client.set_model_version_tag(name, version, f"{TAG}status", status)
    tags = client.get_model_version(name, version).tags or {}
    for key in (f"{TAG}failed.step", f"{TAG}failed.reason", f"{TAG}failed.previous_status"):
        if key in tags:
            client.delete_model_version_tag(name, version, key)


def log_image(name: str, version: str, run_id: str, image: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Record a pushed (and smoke-tested) serving image on a release: version and run tags with the ref and
    manifest digest, metrics, ``image/<mode>.json``, an ``images`` entry in ``lineage.json``, the description.

    Called only after the push (and the smoke test) succeeded: a failed build or push tags nothing.
    Returns the entry that went into the lineage.
    """
    from mlflow.entities import Metric

    t = connect(settings)
    client = t.client
    mode = image["mode"]
    smoke = image.get("smoke") or {}
    entry = {
        "mode": mode,
        "ref": image["ref"],
        "digest": image["digest"],
        "pinned": image["pinned"],
        "served_model_name": image["served_model_name"],
        "base_image": image["base_image"],
        "size_bytes": image["size_bytes"],
        "compressed_bytes": image["compressed_bytes"],
        "pushed_bytes": image["pushed_bytes"],
        "build_seconds": round(image["build_seconds"], 2),
        "push_seconds": round(image["push_seconds"], 2),
        "smoke": {k: smoke[k] for k in ("ready_seconds", "pull_seconds", "served_models", "v1_status_without_key", "parity", "chat") if k in smoke} or None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # The task evaluation of the served container (smoke test): its summary, without the answers (image/<mode>.json has them).
    served = {k: v for k, v in (smoke.get("evaluation") or {}).items() if k not in ("items", "stream_mismatches")} or None
    if served:
        entry["smoke"] = {**(entry["smoke"] or {}), "evaluation": served}
    # The release's served accuracy is its vLLM image's (the merged model as served); a llama.cpp image serves a GGUF
    # export (quantized, maybe): its score stays on its own entry and metrics (eval.served_gguf_*).
    release_served = served if mode != "gguf" else None
    now = int(time.time() * 1000)
    values = {"build_seconds": image["build_seconds"], "push_seconds": image["push_seconds"], "size_bytes": image["size_bytes"],
              "compressed_bytes": image["compressed_bytes"], "pushed_bytes": image["pushed_bytes"]}
    if "ready_seconds" in smoke:
        values["ready_seconds"] = smoke["ready_seconds"]
    metrics = [Metric(f"image.{mode}.{k}", float(v), now, 0) for k, v in values.items()]
    if served:
        prefix = "eval.served_gguf_" if mode == "gguf" else "eval.served_"
        metrics += [Metric(f"{prefix}{k}", float(served[k]), now, 0) for k in ("accuracy", "examples", "correct", "valid", "seconds")]
    client.log_batch(run_id, metrics=metrics)
    t.log_texts(run_id, {f"{mode}.json": json.dumps(image, indent=2, default=str)}, "image")

    def add_image(lineage: dict[str, Any]) -> None:
        lineage["images"] = [i for i in lineage.get("images", []) if i.get("mode") != mode] + [entry]
        if release_served and lineage.get("evaluation"):
            from loraline.evaluate import with_served

            lineage["evaluation"] = with_served(lineage.get("evaluation"), release_served)

    lineage = t.update_lineage(run_id, add_image)
    tags = {"image.ref": image["ref"], "image.digest": image["digest"], "image.mode": mode, "image.pinned": entry["pinned"],
            f"image.{mode}.ref": image["ref"], f"image.{mode}.digest": image["digest"]}
    if release_served:
        tags.update({"eval.served_accuracy": str(release_served["accuracy"]), "eval.served_mode": mode})
    elif served:
        tags["image.gguf.served_accuracy"] = str(served["accuracy"])
    for k, v in tags.items():
        client.set_model_version_tag(name, version, TAG + k, v)
        client.set_tag(run_id, TAG + k, v)
    set_status(client, name, version, "released")
    images = "; ".join(f"image ({i['mode']}): {i['pinned']}" for i in lineage["images"])
    client.update_model_version(name, version, description=f"{version_description(lineage)}\n\n{images}")
    return entry


def experiment_of(run_id: str, settings: Settings) -> str:
    """The experiment id of a release's run (for MLflow UI links)."""
    return str(connect(settings).client.get_run(run_id).info.experiment_id)


def log_report(name: str, version: str, run_id: str, markdown: str, gate: dict[str, Any] | None, settings: Settings) -> None:
    """Attach the release report (``report.md``) and the gate decision (``gate.json``, ``lineage.json``'s ``gate``) to
    the release's run, and the gate's outcome to the model version's description."""
    t = connect(settings)
    t.log_texts(run_id, {"report.md": markdown, **({"gate.json": json.dumps(gate, indent=2)} if gate is not None else {})})
    if gate is not None:
        lineage = t.update_lineage(run_id, gate=gate)
        images = "; ".join(f"image ({i['mode']}): {i['pinned']}" for i in lineage.get("images", []))
        moved = ", ".join(f"{a} -> v{v}" for a, v in gate.get("aliases_moved", {}).items()) or "no alias moved"
        verdict = "passed" if gate["passed"] else "failed: " + "; ".join(gate.get("reasons", []))
        t.client.update_model_version(name, version, description="\n\n".join(
            x for x in (version_description(lineage), images, f"Gate {verdict} ({moved}).") if x))


def log_gguf(name: str, version: str, run_id: str, export: Any, settings: Settings) -> list[dict[str, Any]]:
    """Record a :class:`~loraline.gguf_export.GgufExport` on a release: the GGUF files and each one's parity report as
    artifacts of its run (``gguf/``), tags ``loraline.gguf.<type>.sha256`` / ``.parity`` on the version and the run,
    metrics ``gguf.<type>.*``, a ``gguf`` list in ``lineage.json`` (``quant``, ``uri``, ``sha256``, ``bytes``,
    ``parity``, ``accuracy``, ``converter``, ...). When the files were evaluated on the task: each one's answers as
    ``gguf/evaluation-<type>.json``, metrics ``gguf.<type>.accuracy`` / ``.accuracy_drop`` and tags
    ``loraline.gguf.<type>.accuracy``. Types the release exported before and ``export`` has not stay in the list.
    Returns that list."""
    from mlflow.entities import Metric

    from loraline.gguf_export import parity_dict

    t = connect(settings)
    client = t.client
    if export.skipped:  # --gguf auto on a model llama.cpp's converter refuses: said on the release, nothing exported
        t.update_lineage(run_id, gguf=[], gguf_skipped=export.skipped)
        client.set_model_version_tag(name, version, f"{TAG}gguf.skipped", redact(export.skipped)[:4000])
        client.set_tag(run_id, f"{TAG}gguf.skipped", redact(export.skipped)[:4000])
        return []
    new = [{**s, "uri": f"runs:/{run_id}/gguf/{s['file']}"} for s in export.summary()]
    made = {e["quant"] for e in new}
    # A re-run adding types to a release keeps the files it exported before (resume_plan asks only for missing ones).
    entries = [e for e in t.lineage(run_id).get("gguf") or [] if e.get("quant") not in made] + new
    t.log_texts(run_id, {**{f"parity-{f.quant}.json": json.dumps(parity_dict(f), indent=2) for f in export.files},
                         **{f"evaluation-{f.quant}.json": json.dumps(asdict(f.accuracy), indent=2)
                            for f in export.files if f.accuracy is not None},
                         "gguf.json": json.dumps(entries, indent=2)},
                "gguf", extra=tuple(f.path for f in export.files))
    t.update_lineage(run_id, gguf=entries)
    now = int(time.time() * 1000)
    metrics = []
    for f in export.files:
        p = f.parity
        metrics += [Metric(f"gguf.{f.quant}.{k}", float(v), now, 0) for k, v in (
            ("bytes", f.bytes), ("seconds", f.seconds), ("parity_identical", p.identical), ("parity_close", p.close),
            ("parity_failed", p.failed), ("parity_max_abs_logprob_diff", p.max_abs_logprob_diff))]
        a = f.summary()["accuracy"]
        if a is not None:
            metrics += [Metric(f"gguf.{f.quant}.{k}", float(v), now, 0) for k, v in (
                ("accuracy", a["accuracy"]), ("accuracy_drop", a["drop"])) if v is not None]
    client.log_batch(run_id, metrics=metrics)
    c = export.converter
    tags = {"gguf.types": ",".join(e["quant"] for e in entries),
            "gguf.converter": f"llama-cpp-python=={c['llama_cpp_python']} llama.cpp@{c['llama_cpp_commit']} gguf=={c['gguf']}"}
    for f in export.files:
        p = f.parity
        tags.update({f"gguf.{f.quant}.sha256": f.sha256, f"gguf.{f.quant}.bytes": str(f.bytes),
                     f"gguf.{f.quant}.parity": f"{f.verdict}: {p.identical} identical, {p.close} close, {p.failed} failed of {p.prompts}"})
        if f.accuracy is not None:
            tags[f"gguf.{f.quant}.accuracy"] = str(round(f.accuracy.accuracy, 4))
    for k, v in tags.items():
        client.set_model_version_tag(name, version, TAG + k, v)
        client.set_tag(run_id, TAG + k, v)
    return entries
