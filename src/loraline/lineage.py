"""Read a release chain back from any end: adapter dir or digest, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loraline.errors import LoralineError, TraceError
from loraline.registry import TAG, find_versions, read_lineage, use_mlflow
from loraline.settings import Settings
from loraline.sources import adapter_digest

_MODEL_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")
_SHA = re.compile(r"^(?:sha256:)?(?P<sha>[0-9a-f]{64})$")


def _chain(client: Any, mv: Any) -> dict[str, Any]:
    mv = client.get_model_version(mv.name, mv.version)  # search results carry no aliases
    lineage = read_lineage(client, mv.run_id)
    lineage["model_version"] = str(mv.version)
    lineage["aliases"] = list(getattr(mv, "aliases", []) or [])
    lineage["status"] = (mv.tags or {}).get(f"{TAG}status", "unknown")
    return lineage


def trace(ref: str, settings: Settings) -> dict[str, Any]:
    """Every release chain ``ref`` belongs to; the newest one's fields are also at the top level.

    ``ref`` is an adapter directory, an adapter or merged-model sha256, ``models:/NAME/VERSION``
    or ``models:/NAME@ALIAS``.
    """
    from mlflow.exceptions import MlflowException

    client = use_mlflow(settings)
    m = _MODEL_REF.match(ref)
    try:
        if m and m["version"]:
            versions = [client.get_model_version(m["name"], m["version"])]
        elif m:
            versions = [client.get_model_version_by_alias(m["name"], m["alias"])]
        elif s := _SHA.match(ref.lower()):
            sha = s["sha"]
            versions = find_versions(client, adapter_sha=sha) or find_versions(client, merged_sha=sha)
        elif Path(ref).is_dir():
            try:
                sha = adapter_digest(Path(ref))
            except LoralineError as e:
                raise TraceError(f"cannot trace {ref}: {e}") from e
            versions = find_versions(client, adapter_sha=sha)
        else:
            raise TraceError(
                f"cannot trace {ref!r}: give an adapter directory, a sha256 digest, models:/NAME/VERSION or models:/NAME@ALIAS"
            )
    except MlflowException as e:
        raise TraceError(f"cannot trace {ref!r}: {e.message}; list versions in the MLflow UI or with `mlflow models`") from e
    if not versions:
        raise TraceError(f"no release found for {ref!r} in {settings.resolved_tracking_uri}; release it with `loraline release`")
    chains = [_chain(client, mv) for mv in versions]
    newest = max(chains, key=lambda c: c.get("created", ""))
    return {"ref": ref, **newest, "chains": chains}


def release_of(ref: str, settings: Settings) -> dict[str, Any]:
    """The newest release chain ``ref`` names (anything :func:`trace` takes), without the list of chains."""
    chain = trace(ref, settings)
    chain.pop("chains")
    chain.pop("ref")
    return chain
