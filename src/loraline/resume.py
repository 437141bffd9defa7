"""What a release still has to do, given what MLflow already holds of it (a re-run continues, it never starts over).

A release of the same adapter digest onto the same base digest under the same name is found in MLflow
(:func:`loraline.registry.find_release`); its ``lineage.json`` says which of evaluation, benchmark, image and gate are
done. :func:`resume_plan` turns that into the steps left, so the flow only wires them (and this is testable without
Prefect).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from loraline.settings import Settings


@dataclass(frozen=True)
class ResumePlan:
    """The steps a release runs. ``register``: nothing is in MLflow yet (merge, parity and registration run first);
    ``gguf``: the GGUF types still to export (a release gated before gets the ones asked for now);
    ``gate``: the gate and the report run (False only when the release is :attr:`done`)."""

    register: bool
    evaluate: bool
    benchmark: bool
    image: bool
    gate: bool
    gguf: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        """Released and gated before, nothing asked for is missing: a re-run changes nothing (no alias moves back)."""
        return not self.gate


def resume_plan(existing: dict[str, Any] | None, settings: Settings, mode: str, gguf: Sequence[str] = (),
                gguf_required: bool = False) -> ResumePlan:
    """The steps left for a release whose earlier lineage is ``existing`` (None: never registered), with
    ``settings.eval``/``settings.bench`` asking for evaluation and benchmark, image ``mode`` (``none``: no image) and
    GGUF types ``gguf`` (:func:`~loraline.gguf_export.gguf_types`; ``gguf_required``: asked for by name, not ``auto``).

    A type the release has not exported yet is exported now, and the gate and report run again with it, as for an
    image of a new mode: a release gated before the GGUF step existed gets its files from a re-run. On ``auto``, a
    model llama.cpp's converter refused before (``gguf_skipped``) is not tried again."""
    if existing is None:
        return ResumePlan(register=True, evaluate=settings.eval, benchmark=settings.bench, image=mode != "none", gate=True,
                          gguf=tuple(gguf))
    evaluate = settings.eval and not existing.get("evaluation")
    benchmark = settings.bench and not existing.get("benchmark")
    image = mode != "none" and not any(i.get("mode") == mode for i in existing.get("images", []))
    have = {g.get("quant") for g in existing.get("gguf") or []}
    missing = () if existing.get("gguf_skipped") and not gguf_required else tuple(q for q in gguf if q not in have)
    report_failed = existing.get("failed_step") == "report"
    return ResumePlan(register=False, evaluate=evaluate, benchmark=benchmark, image=image, gguf=missing,
                      gate=evaluate or benchmark or image or bool(missing) or report_failed or "gate" not in existing)


def with_image(lineage: dict[str, Any], mode: str) -> dict[str, Any]:
    """A release's answer: its lineage, and ``image`` {ref, digest, mode, pinned}: its image of ``mode``, if any."""
    img = next((i for i in lineage.get("images", []) if i.get("mode") == mode), None)
    out = dict(lineage)
    if img is not None:
        out["image"] = {k: img[k] for k in ("ref", "digest", "mode", "pinned")}
    return out


def cached_release(adapter: str, base: str, name: str, settings: Settings, image: str | None = None,
                   gguf: str | None = None) -> dict[str, Any] | None:
    """The answer of a release that has nothing left to do, read from MLflow without a flow run; None when the release
    flow has to run (or to decide).

    A re-run of a release whose adapter digest and base digest are already released as ``name``, and whose resume plan
    (:func:`resume_plan`, for these settings, image mode and GGUF types ``gguf``) is :attr:`ResumePlan.done`, changes nothing: the flow would
    fetch, validate (a cache hit), find the version and print its lineage. This answers the same lineage, marked
    ``"cached": true`` (the flow's re-run answer has ``"existing": true`` too), for local sources (an adapter directory;
    a base directory, or a ``.gguf`` file already converted in this home), when every version of these digests is
    finished and none is held by another live process, and the settings validation depends on still let the adapter
    through (:func:`loraline.validation.settings_allow`). Anything else — a remote source, a version still registering
    or running its steps, MLflow refusing the credentials (the flow may have them from a Prefect Secret block), a step
    left to do — is the flow's (None). An MLflow server that does not answer raises the :class:`TrackingError` the flow
    would raise after the same wait. Reads only: nothing is claimed, written or copied.
    """
    from loraline.digest import digest_dir, sha256_file
    from loraline.errors import LoralineError, TrackingError
    from loraline.gguf_export import gguf_required, gguf_types
    from loraline.image import image_mode
    from loraline.registry import OWNER, check_model_name, existing_lineage, held_by_other
    from loraline.sources import adapter_digest, parse_source
    from loraline.tracking import UNAVAILABLE, connect
    from loraline.validation import settings_allow

    if image is not None:
        settings = settings.model_copy(update={"image": image})
    try:
        check_model_name(name)
        mode = image_mode(settings)
        types = gguf_types(settings, gguf)
        a_src, b_src = parse_source(adapter), parse_source(base)
        if a_src.kind != "local" or b_src.kind != "local" or not Path(a_src.location).is_dir():
            return None  # remote sources are fetched by the flow (retried); archives are extracted there
        adapter_sha = adapter_digest(Path(a_src.location))
        kept = settings.adapters_dir / adapter_sha  # what fetch kept of it when it was released from this home
        if not kept.is_dir():
            return None  # a new adapter (a first release pays only this digest before the flow)
        base_dir = Path(b_src.location)
        if base_dir.suffix.lower() == ".gguf" and base_dir.is_file():
            base_dir = settings.bases_dir / f"gguf-{sha256_file(base_dir)}"  # converted once, by the first release
        if not (base_dir / "config.json").is_file() or not settings_allow(kept, base_dir, settings):
            return None  # a base not converted yet, or validation would now refuse the pair (the flow says why)
        base_sha = digest_dir(base_dir)
        t = connect(settings)
        versions = t.find_versions(name=name, adapter_sha=adapter_sha, base_sha=base_sha)
        if not versions or any(t.client.get_run(mv.run_id).info.status != "FINISHED" for mv in versions):
            return None  # never released, or a release of these digests is still registering (or was killed): the flow waits or cleans up
        mv = versions[0]  # the oldest: the one the flow continues
        tags = t.version_tags(mv.name, mv.version)
        if held_by_other(tags.get(OWNER)):
            return None  # another process runs its steps: the flow waits for it
        lineage = existing_lineage(t, mv.run_id, tags)
        if not resume_plan(lineage, settings, mode, types, gguf_required(settings, gguf)).done:
            return None
    except TrackingError as e:
        if e.error_code == UNAVAILABLE:  # the flow would wait out MLflow's retries again, then fail with this error
            raise
        return None  # e.g. refused credentials: the flow also reads the Prefect Secret block of the MLflow password
    except (LoralineError, OSError):
        return None  # the flow says what is wrong, with its fix
    return {**with_image(lineage, mode), "cached": True}
