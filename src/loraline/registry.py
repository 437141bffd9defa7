"""Registering a release in the MLflow Model Registry (through :mod:`loraline.tracking`, the MLflow seam); what the
steps after registration record on it is :mod:`loraline.records`'.

A release is one MLflow run (params, metrics, artifacts, the logged model) and one version of
the registered model, created with its lineage tags in the same call. If anything fails after
the run starts, the version (and a registered model this release created) is deleted and the run
is marked FAILED: a failed release leaves no model version, alias or RUNNING run behind.

The steps after registration (evaluate, benchmark, image, gate, report) of a version are run by one process at a time:
the version tag ``loraline.owner`` (host:pid) names it, from the version's creation (or :func:`find_release`) until
:func:`holding` ends; another release of the same digests waits for it, and takes over when it has ended.
"""

from __future__ import annotations

import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from loraline import __version__
from loraline.errors import ParityError, RegistryError, SettingsError, TrackingError
from loraline.merge import MergedModel
from loraline.parity import ParityReport
from loraline.settings import VLLM_GPU_MEMORY_UTILIZATION, Settings, redact
from loraline.sources import FetchedAdapter, FetchedBase, S3Source
from loraline.tracking import EXISTS, LINEAGE_FILE, SERVER_FAILED, TAG, Tracking, connect, failure
from loraline.validation import ValidationReport

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    """Refuse names MLflow, URIs and image repositories cannot all carry."""
    if not _NAME.match(name):
        raise SettingsError(
            f"model name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. smol-sql)"
        )
    return name


def owner() -> str:
    """This process, as the registering owner of a release (run tag ``loraline.owner``) and as the one running the
    steps after registration on its model version (version tag ``loraline.owner``): host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


OWNER = f"{TAG}owner"
FINISH_WAIT_S = 300.0  # how long a release waits for another process's registration of the same digests
STEPS_WAIT_S = 3600.0  # ... and for another process running the steps after registration (evaluate ... report)
CLAIM_SETTLE_S = 0.5  # between taking a version's steps and reading back who has them


def _owner_dead(owner: str | None) -> bool:
    """True when ``owner`` (host:pid) is a process on this host that no longer runs."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's (or an unknown) process: it may still be registering
    try:
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def held_by_other(holder: str | None) -> bool:
    """True when ``holder`` (a ``loraline.owner`` tag) names another process that may still run."""
    return bool(holder) and holder != owner() and not _owner_dead(holder)


def _claim(client: Any, name: str, version: str) -> bool:
    """Take the steps after registration of ``models:/name/version`` for this process (version tag ``loraline.owner``).
    MLflow tags are last-writer-wins: set, wait :data:`CLAIM_SETTLE_S`, read back; of two processes that found the
    version free at the same moment, the later writer holds it and the other goes back to waiting."""
    try:
        client.set_model_version_tag(name, version, OWNER, owner())
    except TrackingError as e:  # two writers of one tag at once: MLflow's SQLite store answers with a UNIQUE error
        if "UNIQUE constraint" not in str(e):
            raise
    time.sleep(CLAIM_SETTLE_S)
    return (client.get_model_version(name, version).tags or {}).get(OWNER) == owner()


def release_claim(name: str, version: str, settings: Settings) -> None:
    """This process is done with the steps of ``models:/name/version`` (they succeeded or failed): another release of
    it may go on. Best effort: when MLflow does not answer, the tag names this process, and a process that has ended
    holds nothing."""
    try:
        client = connect(settings).client
        if (client.get_model_version(name, version).tags or {}).get(OWNER) == owner():
            client.delete_model_version_tag(name, version, OWNER)
    except TrackingError:
        pass


@contextmanager
def holding(name: str, version: str, settings: Settings) -> Iterator[None]:
    """The steps after registration of ``models:/name/version``, which :func:`find_release` or :func:`register_model`
    gave this process: given back when they end (:func:`release_claim`), except after MLflow stopped answering (asking
    it again would wait out the client's retries; the process that holds them ends)."""
    try:
        yield
    except TrackingError as e:
        if e.error_code not in SERVER_FAILED:
            release_claim(name, version, settings)
        raise
    except BaseException:
        release_claim(name, version, settings)
        raise
    release_claim(name, version, settings)


def _end_interrupted(client: Any, run_id: str) -> None:
    """End the run of a release whose process died mid-way: FAILED, ``loraline.status=interrupted``."""
    client.set_tag(run_id, f"{TAG}status", "interrupted")
    client.set_terminated(run_id, "FAILED")


def _abandon(client: Any, name: str, mv: Any, run: Any) -> None:
    """Undo what a registering process killed mid-way left: its version goes, its run is marked FAILED."""
    client.delete_model_version(name, mv.version)
    _end_interrupted(client, run.info.run_id)


def end_dead_runs(client: Any, experiment: str, adapter_sha: str, base_sha: str) -> list[str]:
    """Runs of these digests left RUNNING by a process that died before it created a version (killed, or its MLflow
    server went away): marked FAILED with ``loraline.status=interrupted``. Returns their ids."""
    runs = client.search_runs([experiment], f"attributes.status = 'RUNNING' and tags.`{TAG}adapter.sha256` = '{adapter_sha}' "
                                            f"and tags.`{TAG}base.sha256` = '{base_sha}'")
    dead = [r for r in runs if _owner_dead(r.data.tags.get(OWNER))]
    for r in dead:
        _end_interrupted(client, r.info.run_id)
    return [r.info.run_id for r in dead]


def settled_release(t: Tracking, name: str, versions: Sequence[Any], wait_s: float = FINISH_WAIT_S,
                    steps_wait_s: float = STEPS_WAIT_S, progress: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The lineage of the oldest finished release among ``versions``, its steps after registration now held by this
    process (:func:`release_claim` gives them back). Waits while a live process is still registering one, or is running
    its steps (evaluate ... report: two processes never run them at once); versions left by a process that was killed
    while registering (run RUNNING, owner gone) are removed."""
    client = t.client
    start = time.monotonic()
    pending = list(versions)
    told: set[str] = set()
    while pending:
        registering, stepping = [], []
        for mv in pending:
            run = client.get_run(mv.run_id)
            if run.info.status == "FINISHED":
                tags = client.get_model_version(name, mv.version).tags or {}
                mine = tags.get(OWNER) == owner()
                if not mine and (held_by_other(tags.get(OWNER)) or not _claim(client, name, mv.version)):
                    holder = (client.get_model_version(name, mv.version).tags or {}).get(OWNER)
                    stepping.append((mv, holder))
                    if progress is not None and holder not in told:
                        told.add(holder)
                        progress(f"models:/{name}/{mv.version} has these digests; {holder} is running its steps: waiting")
                    continue
                return existing_lineage(t, mv.run_id, tags)
            if run.info.status == "RUNNING" and not _owner_dead(run.data.tags.get(OWNER)):
                registering.append(mv)
            else:  # killed (or failed without its rollback): nothing of it may stay
                _abandon(client, name, mv, run)
        waited = time.monotonic() - start
        if registering and waited > wait_s:
            runs = ", ".join(f"{mv.run_id} (owner {client.get_run(mv.run_id).data.tags.get(OWNER)})" for mv in registering)
            raise RegistryError(f"{name}: another release of the same adapter and base is still registering (runs {runs}); "
                                "wait for it, or end that run in the MLflow UI if its process is gone")
        if stepping and waited > steps_wait_s:
            mv, holder = stepping[0]
            raise RegistryError(f"models:/{name}/{mv.version}: another release ({holder}) has been running its steps for "
                                f"{waited:.0f} s; wait for it, or delete the tag {OWNER} of that version in the MLflow UI "
                                "if its process is gone")
        if not registering and not stepping:
            return None
        time.sleep(1.0)
        pending = registering + [mv for mv, _ in stepping]
    return None


def existing_lineage(t: Any, run_id: str, tags: dict[str, str]) -> dict[str, Any]:
    """An earlier release's answer: its run's lineage, marked existing, with its version's status and failed step."""
    return {**t.lineage(run_id), "existing": True, "status": tags.get(f"{TAG}status"),
            "failed_step": tags.get(f"{TAG}failed.step")}


def find_release(name: str, adapter: FetchedAdapter, base: FetchedBase, settings: Settings,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The lineage of the existing release of this adapter digest onto this base digest as ``name``, if any; its steps
    after registration are then this process's until :func:`release_claim` (see :func:`settled_release`)."""
    t = connect(settings)
    found = t.find_versions(name=name, adapter_sha=adapter.sha256, base_sha=base.sha256)
    return settled_release(t, name, found, progress=progress) if found else None


def _parity_line(p: ParityReport) -> str:
    firsts = [r.first_divergence for r in p.results if r.first_divergence is not None]
    line = f"{p.identical} identical, {p.close} close, {p.failed} failed of {p.prompts}"
    return line + (f"; first divergence at tokens {firsts}" if firsts else "")


def _tags(adapter: FetchedAdapter, base: FetchedBase, merged: MergedModel, validation: ValidationReport,
          parity: ParityReport, vllm_parity: Sequence[ParityReport] = ()) -> dict[str, str]:
    t = {
        "adapter.sha256": adapter.sha256,
        "adapter.source": adapter.source,
        "adapter.resolved": adapter.resolved,
        "adapter.path": str(adapter.path),
        "base.sha256": base.sha256,
        "base.source": base.source,
        "base.resolved": base.resolved,
        "merged.sha256": merged.sha256,
        "merged.dtype": merged.dtype,
        "merged.path": str(merged.path),
        "merged.method": merged.method,
        "lora.r": str(validation.r),
        "lora.runtime_servable": str(validation.runtime_lora_servable).lower(),
        "parity": _parity_line(parity),
        "vllm_parity": "; ".join(f"{p.b}: {_parity_line(p)}" for p in vllm_parity) or "skipped",
        "status": "registered",
        "version": __version__,
    }
    if adapter.revision:
        t["adapter.revision"] = adapter.revision
    if base.revision:
        t["base.revision"] = base.revision
    if base.gguf:  # the base was converted from a GGUF file: which file, from which package, by what
        t.update(_gguf_tags(base))
    for part, fetched in (("adapter", adapter), ("base", base)):
        if fetched.s3:  # downloaded from S3: which store, which objects at which ETag / version
            t.update(_s3_tags(part, fetched.s3))
    return {TAG + k: redact(v) for k, v in t.items()}


def _s3_tags(part: str, s3: S3Source) -> dict[str, str]:
    objects = "; ".join(f"{o.key} {o.etag}" + (f" {o.version_id}" if o.version_id else "") for o in s3.objects)
    if len(objects) > 4000:  # a run tag holds 8000 characters; lineage.json has them all
        objects = f"{len(s3.objects)} objects: see lineage.json {part}.s3.objects"
    return {f"{part}.s3.endpoint": s3.endpoint, f"{part}.s3.objects": objects}


def _gguf_tags(base: FetchedBase) -> dict[str, str]:
    g = base.gguf
    assert g is not None
    t = {"base.gguf.sha256": g.sha256, "base.gguf.file": g.file, "base.gguf.origin": g.origin,
         "base.gguf.converter": " ".join(f"{k}=={v}" for k, v in g.converter)}
    if g.package:
        t.update({"base.gguf.package": g.package, "base.gguf.package_version": g.package_version or ""})
    return t


def _params(adapter: FetchedAdapter, base: FetchedBase, validation: ValidationReport, settings: Settings) -> dict[str, str]:
    return {k: redact(v) for k, v in {
        "adapter.source": adapter.source,
        "adapter.sha256": adapter.sha256,
        "adapter.revision": adapter.revision or "",
        "base.source": base.source,
        "base.sha256": base.sha256,
        "base.revision": base.revision or "",
        **({"base.gguf.sha256": base.gguf.sha256, "base.gguf.origin": base.gguf.origin} if base.gguf else {}),
        "lora.r": str(validation.r),
        "lora.alpha": str(validation.lora_alpha),
        "lora.target_modules": ",".join(validation.target_modules),
        "lora.use_dora": str(validation.use_dora).lower(),
        "lora.modules_to_save": ",".join(validation.modules_to_save),
        "lora.serving_max_lora_rank": str(validation.serving_max_lora_rank),
        "merge.dtype": settings.merge_dtype,
        "parity.prompts": str(settings.parity_prompts),
        "parity.max_new_tokens": str(settings.parity_max_new_tokens),
        "parity.top_k": str(settings.parity_top_k),
    }.items()}


def _metrics(adapter: FetchedAdapter, merged: MergedModel, validation: ValidationReport, parity: ParityReport,
             vllm_parity: Sequence[ParityReport] = ()) -> dict[str, float]:
    m = {
        "merge_seconds": merged.seconds,
        "parity_seconds": parity.seconds,
        "adapter_bytes": float(sum((adapter.path / f).stat().st_size for f in adapter.files)),
        "merged_bytes": float(merged.bytes),
        "merged_parameters": float(merged.parameters),
        "lora_parameters": float(validation.lora_parameters),
        "parity_identical": float(parity.identical),
        "parity_close": float(parity.close),
        "parity_failed": float(parity.failed),
        "parity_max_abs_logprob_diff": parity.max_abs_logprob_diff,
    }
    for p in vllm_parity:  # e.g. vllm_merged_parity_failed, vllm_lora_parity_identical
        key = p.b.replace("-", "_")
        m.update({f"{key}_parity_identical": float(p.identical), f"{key}_parity_close": float(p.close),
                  f"{key}_parity_failed": float(p.failed), f"{key}_parity_max_abs_logprob_diff": p.max_abs_logprob_diff,
                  f"{key}_parity_seconds": p.seconds})
        if p.max_model_len:  # the context the engine ran the model with (the model's own, capped on CPU)
            m[f"{key}_max_model_len"] = float(p.max_model_len)
    if adapter.training_step is not None:
        m["training_step"] = float(adapter.training_step)
    if adapter.training_loss is not None:
        m["training_loss"] = adapter.training_loss
    return m


def kv_plan_record(merged: MergedModel, settings: Settings) -> tuple[dict[str, float], str, dict[str, Any]]:
    """The release's KV-cache plan on ``settings.plan_device`` (:mod:`loraline.plan`): ``(plan.* metrics, the
    ``loraline.plan`` tag, lineage's ``plan`` section)``. A model the planner cannot plan is recorded as such: a plan
    is a record of the release, never a reason to refuse it."""
    from loraline.plan import plan_kv_cache

    try:
        p = plan_kv_cache(merged.path, settings, device=settings.plan_device,
                          gpu_memory_utilization=settings.image_gpu_memory_utilization or VLLM_GPU_MEMORY_UTILIZATION)
    except Exception as e:  # noqa: BLE001 - see the docstring; the reason is in the tag and the lineage
        return {}, f"not planned: {e}"[:4000], {"device": settings.plan_device, "error": str(e)}
    return p.metrics(), p.summary(), {**p.to_dict(), "summary": p.summary()}


def build_lineage(*, name: str, version: str, run_id: str, settings: Settings, adapter: FetchedAdapter, base: FetchedBase,
                  merged: MergedModel, validation: ValidationReport, parity: ParityReport,
                  vllm_parity: Sequence[ParityReport] = (), plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The release record: written as ``lineage.json`` and printed by ``loraline release --json``."""
    return {
        "schema": "loraline.lineage/v1",
        "model_name": name,
        "model_version": str(version),
        "model_uri": f"models:/{name}/{version}",
        "tracking_uri": redact(settings.resolved_tracking_uri),
        "mlflow_run_id": run_id,
        "adapter": {
            "source": redact(adapter.source),
            "resolved": redact(adapter.resolved),
            "revision": adapter.revision,
            "sha256": adapter.sha256,
            "path": str(adapter.path),
            "files": list(adapter.files),
            "training_step": adapter.training_step,
            "training_loss": adapter.training_loss,
            **({"s3": adapter.s3.to_dict()} if adapter.s3 else {}),
        },
        "base": {"source": redact(base.source), "resolved": redact(base.resolved), "revision": base.revision, "name": base.name, "sha256": base.sha256,
                 **({"gguf": base.gguf.to_dict()} if base.gguf else {}), **({"s3": base.s3.to_dict()} if base.s3 else {})},
        "merged": {"path": str(merged.path), "sha256": merged.sha256, "dtype": merged.dtype, "bytes": merged.bytes,
                   "parameters": merged.parameters, "method": merged.method, "fallback_reason": merged.fallback_reason},
        "lora": {
            "r": validation.r,
            "alpha": validation.lora_alpha,
            "target_modules": list(validation.target_modules),
            "runtime_lora_servable": validation.runtime_lora_servable,
            "serving_max_lora_rank": validation.serving_max_lora_rank,
            "parameters": validation.lora_parameters,
            "notes": list(validation.notes),
        },
        "parity": parity.summary(),
        "vllm_parity": {p.b: {**p.summary(), "first_divergences": [r.first_divergence for r in p.results]} for p in vllm_parity},
        **({"plan": plan} if plan is not None else {}),
        "images": [],
        "loraline_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def version_description(lineage: dict[str, Any]) -> str:
    """The model version's description (lineage summary); :mod:`loraline.records` appends the images and the gate."""
    a, b, m, p = lineage["adapter"], lineage["base"], lineage["merged"], lineage["parity"]
    g = f", converted from the GGUF of {b['gguf']['origin']} (sha256 {b['gguf']['sha256'][:12]})" if b.get("gguf") else ""
    return (
        f"LoRA adapter {a['source']} (sha256 {a['sha256'][:12]}) merged into {b['source']} (sha256 {b['sha256'][:12]}{g}) "
        f"-> merged sha256 {m['sha256'][:12]}, {m['dtype']}, {m['bytes']} bytes. "
        f"Parity vs peft unmerged: {p['identical']} identical, {p['close']} close, {p['failed']} failed of {p['prompts']}. "
        f"Run {lineage['mlflow_run_id']}; trace: loraline trace models:/{lineage['model_name']}/{lineage['model_version']}"
    )


def register_model(name: str, adapter: FetchedAdapter, base: FetchedBase, validation: ValidationReport,
                   merged: MergedModel, parity: ParityReport, settings: Settings,
                   vllm_parity: Sequence[ParityReport] = (), progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Record a release in MLflow and register the merged model as a version of ``name``; its steps after registration
    (evaluate ... report) are this process's until :func:`release_claim`.

    Idempotent: when a version of ``name`` already carries this adapter digest on this base
    digest, its lineage is returned (with ``"existing": true``) and nothing is created (after waiting for a process
    still running its steps: :func:`settled_release`).
    """
    import mlflow

    check_model_name(name)
    for p in (parity, *vllm_parity):
        if not p.passed:
            raise ParityError(f"refusing to register {name}: parity {p.a} vs {p.b} failed on {p.failed} of {p.prompts} prompts")
    existing = find_release(name, adapter, base, settings, progress)
    if existing is not None:
        return existing
    t = connect(settings)
    client = t.client
    exp = t.experiment_id(name)
    try:
        client.get_registered_model(name)
        created_model = False
    except TrackingError:
        try:
            client.create_registered_model(name, tags={f"{TAG}managed": "true"},
                                           description=f"LoRA releases served by vLLM ({name}); made by loraline")
            created_model = True
        except TrackingError as e:
            # Another release created it between our get and create (seen with 8 at once on a server).
            if e.error_code != EXISTS:
                raise
            created_model = False

    end_dead_runs(client, exp, adapter.sha256, base.sha256)
    plan_metrics, plan_tag, plan = kv_plan_record(merged, settings)
    tags = {**_tags(adapter, base, merged, validation, parity, vllm_parity), TAG + "plan": redact(plan_tag)}
    run = mlflow.start_run(experiment_id=exp, run_name=f"release {name} adapter {adapter.sha256[:12]}",
                           tags={**tags, OWNER: owner()})
    run_id = run.info.run_id
    version = None
    try:
        mlflow.log_params(_params(adapter, base, validation, settings))
        mlflow.log_metrics({**_metrics(adapter, merged, validation, parity, vllm_parity), **plan_metrics})
        mlflow.log_artifact(str(adapter.path / "adapter_config.json"))
        mlflow.log_dict(parity.to_dict(), "parity.json")
        for p in vllm_parity:
            mlflow.log_dict(p.to_dict(), f"parity-{p.b}.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc.py")),
            artifacts={"weights": str(merged.path)},
            pip_requirements=["vllm"],  # the serving environment; the orchestrator never loads it
            tags=tags,
        )
        # Created with its steps held by this process (OWNER): a release of the same digests waits for them.
        mv = client.create_model_version(name, source=info.model_uri, run_id=run_id,
                                         tags={**tags, f"{TAG}run_id": run_id, OWNER: owner()},
                                         model_id=info.model_id)
        version = mv.version
        # Two releases of the same digests racing: the oldest version wins, the newer is undone.
        same = t.find_versions(name=name, adapter_sha=adapter.sha256, base_sha=base.sha256)
        older = [v for v in same if int(v.version) < int(version)]
        if older:
            client.delete_model_version(name, version)
            version = None
            mlflow.set_tag(f"{TAG}status", "duplicate")
            mlflow.end_run("KILLED")
            winner = settled_release(t, name, older, progress=progress)  # waits for the older one's registration and steps
            if winner is None:
                raise RegistryError(f"{name}: the release of this adapter registered at the same time was interrupted; run the release again")
            return winner
        lineage = build_lineage(name=name, version=str(version), run_id=run_id, settings=settings, adapter=adapter,
                                base=base, merged=merged, validation=validation, parity=parity, vllm_parity=vllm_parity,
                                plan=plan)
        mlflow.log_dict(lineage, LINEAGE_FILE)
        client.update_model_version(name, version, description=version_description(lineage))
        mlflow.set_tag(f"{TAG}model_version", str(version))
        client.update_run(run_id, name=f"{name}-v{version} adapter {adapter.sha256[:12]}")  # readable in the runs list
        mlflow.end_run("FINISHED")
    except BaseException as e:
        if version is not None:
            client.delete_model_version(name, version)
        if created_model and not client.search_model_versions(f"name = '{name}'"):
            client.delete_registered_model(name)
        mlflow.end_run("FAILED")
        err = e if isinstance(e, TrackingError) else failure(e, t.where)  # the fluent calls raise MLflow's own
        if err is not None:
            raise TrackingError(f"registering {name} in MLflow ({t.where}) failed: {err}; nothing was registered",
                                error_code=err.error_code) from e
        raise
    return {**lineage, "existing": False}
