"""Read a release chain back from any end: adapter dir or digest, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
or a serving image (by reference, read from its registry's labels without pulling or running it, or by digest)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loraline.errors import LoralineError, TraceError, TrackingError
from loraline.settings import Settings
from loraline.sources import adapter_digest
from loraline.tracking import SERVER_FAILED, TAG, Tracking, connect

_MODEL_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")
_SHA = re.compile(r"^(?:sha256:)?(?P<sha>[0-9a-f]{64})$")
_IMAGE_REF = re.compile(r"^(?![a-z]+:/)[^/\s]+[.:][^/\s]*/[^\s]+$")  # HOST.TLD/... or HOST:PORT/...


def _chain(t: Tracking, mv: Any) -> dict[str, Any]:
    mv = t.client.get_model_version(mv.name, mv.version)  # search results carry no aliases
    lineage = t.lineage(mv.run_id)
    lineage["model_version"] = str(mv.version)
    lineage["aliases"] = list(getattr(mv, "aliases", []) or [])
    lineage["status"] = (mv.tags or {}).get(f"{TAG}status", "unknown")
    return lineage


def trace(ref: str, settings: Settings) -> dict[str, Any]:
    """Every release chain ``ref`` belongs to; the newest one's fields are also at the top level.

    ``ref`` is an adapter directory, an adapter or merged-model sha256, a base's ``.gguf`` file or its sha256, a GGUF
    file a release exported (``loraline.gguf.<type>.sha256``) or its sha256,
    ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``.
    """
    t = connect(settings)
    client = t.client
    m = _MODEL_REF.match(ref)
    try:
        if m and m["version"]:
            versions = [client.get_model_version(m["name"], m["version"])]
        elif m:
            versions = [client.get_model_version_by_alias(m["name"], m["alias"])]
        elif s := _SHA.match(ref.lower()):
            sha = s["sha"]
            versions = (t.find_versions(adapter_sha=sha) or t.find_versions(merged_sha=sha)
                        or t.find_versions(gguf_sha=sha) or _exported_gguf_versions(client, sha)
                        or _image_versions(client, f"sha256:{sha}"))
        elif ref.lower().endswith(".gguf") and Path(ref).is_file():  # a GGUF file some base was converted from
            from loraline.digest import sha256_file

            sha = sha256_file(Path(ref))
            versions = t.find_versions(gguf_sha=sha) or _exported_gguf_versions(client, sha)
        elif Path(ref).is_dir():
            try:
                sha = adapter_digest(Path(ref))
            except LoralineError as e:
                raise TraceError(f"cannot trace {ref}: {e}") from e
            versions = t.find_versions(adapter_sha=sha)
        elif _IMAGE_REF.match(ref):
            return _trace_image(t, ref)
        else:
            raise TraceError(
                f"cannot trace {ref!r}: give an adapter directory, a base's .gguf file, a sha256 digest, models:/NAME/VERSION, models:/NAME@ALIAS "
                "or an image reference HOST[:PORT]/NAME:TAG or HOST[:PORT]/NAME@sha256:DIGEST"
            )
    except TrackingError as e:
        raise TraceError(f"cannot trace {ref!r}: {e}; list versions in the MLflow UI or with `mlflow models`") from e
    if not versions:
        raise TraceError(f"no release found for {ref!r} in {settings.resolved_tracking_uri}; release it with `loraline release`")
    chains = [_chain(t, mv) for mv in versions]
    newest = max(chains, key=lambda c: c.get("created", ""))
    return {"ref": ref, **newest, "chains": chains}


def _exported_gguf_versions(client: Any, sha: str) -> list[Any]:
    """Model versions that exported a GGUF file with this sha256 (any type: tag ``loraline.gguf.<type>.sha256``)."""
    from loraline.settings import GGUF_TYPES

    found = []
    for quant in GGUF_TYPES:
        found += client.search_model_versions(f"tags.`{TAG}gguf.{quant}.sha256` = '{sha}'", max_results=1000)
    return sorted(found, key=lambda v: (v.name, int(v.version)))


def _image_versions(client: Any, digest: str) -> list[Any]:
    """Model versions whose image (any mode) has this manifest digest."""
    from loraline.image import MODES

    found = []
    for mode in MODES:
        found += client.search_model_versions(f"tags.`{TAG}image.{mode}.digest` = '{digest}'", max_results=1000)
    return sorted(found, key=lambda v: (v.name, int(v.version)))


def _trace_image(t: Tracking, ref: str) -> dict[str, Any]:
    """An image's chain: its labels from the registry name the model version; MLflow holds the rest."""
    from loraline.errors import ImageError
    from loraline.image import LABEL
    from loraline.oci import registry_image

    try:
        img = registry_image(ref, t.settings.registry_auth)
    except ImageError as e:
        raise TraceError(f"cannot trace {ref!r}: {e}") from e
    labels = img["labels"]
    name, version = labels.get(LABEL + "model.name"), labels.get(LABEL + "model.version")
    if not name or not version:
        raise TraceError(f"{ref} ({img['digest']}) has no org.loraline.model.* labels: it was not built by loraline")
    try:
        mv = t.client.get_model_version(name, version)
    except TrackingError as e:
        if e.error_code in SERVER_FAILED:  # say that, not "that server does not have it"
            raise TraceError(f"cannot trace {ref!r}: {e}") from e
        raise TraceError(
            f"{ref} is models:/{name}/{version} (run {labels.get(LABEL + 'mlflow.run_id')}, tracking URI "
            f"{labels.get(LABEL + 'mlflow.tracking_uri')}), which {t.where} does not have: point "
            "LORALINE_TRACKING_URI at the MLflow that released it"
        ) from e
    chain = _chain(t, mv)
    recorded = any(i.get("digest") == img["digest"] for i in chain.get("images", []))
    image = {**img, "recorded": recorded, "mode": labels.get(LABEL + "mode")}
    return {"ref": ref, **chain, "registry_image": image, "chains": [chain]}


def release_of(ref: str, settings: Settings) -> dict[str, Any]:
    """The newest release chain ``ref`` names (anything :func:`trace` takes), without the list of chains."""
    chain = trace(ref, settings)
    chain.pop("chains")
    chain.pop("ref")
    return chain
