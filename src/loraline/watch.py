"""What the watch deployment looks at: adapters in a directory, or logged to an MLflow experiment.

:func:`adapter_sources` lists adapter sources (directories holding ``adapter_config.json``, or
``runs:/RUN_ID/PATH`` for each run artifact folder that holds one); :func:`scan` digests each and
says which are new for a registered model: ``new`` (no version carries its adapter digest),
``released`` (one does), ``duplicate`` (the same digest appeared earlier in this scan) or
``invalid`` (it could not be read; the detail says why). Releasing the ``new`` ones is the flow's job;
since a release is keyed on the adapter digest, a second scan finds them ``released``: idempotent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraline.errors import LoralineError, TrackingError, WatchError
from loraline.settings import Settings
from loraline.sources import adapter_digest, fetch_adapter
from loraline.tracking import SERVER_FAILED, Tracking, connect

MAX_DEPTH = 3  # how deep below the watched directory adapters are looked for


@dataclass(frozen=True)
class Candidate:
    source: str
    state: str  # new | released | duplicate | invalid
    sha256: str | None = None
    model_version: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dirs(root: Path) -> list[Path]:
    found = []
    for config in root.rglob("adapter_config.json"):
        d = config.parent
        if len(d.relative_to(root).parts) <= MAX_DEPTH and not any(p.startswith(".") for p in d.relative_to(root).parts):
            found.append(d)
    return sorted(found, key=lambda d: (d.stat().st_mtime, str(d)))  # oldest first: released in the order written


def _runs(experiment: str, settings: Settings) -> list[str]:
    client = connect(settings).client
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise WatchError(f"MLflow experiment {experiment!r} does not exist in {settings.resolved_tracking_uri}; "
                         "log adapters to it (mlflow.log_artifacts(checkpoint_dir, 'adapter')) or fix the name")
    sources = []
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"],
                              max_results=1000)
    for run in runs:
        stack = [""]
        while stack:
            folder = stack.pop()
            items = client.list_artifacts(run.info.run_id, folder or None)
            if any(not i.is_dir and Path(i.path).name == "adapter_config.json" for i in items):
                sources.append(f"runs:/{run.info.run_id}/{folder}".rstrip("/"))
                continue
            if folder.count("/") < MAX_DEPTH - 1:
                stack += [i.path for i in items if i.is_dir]
    return sources


def adapter_sources(settings: Settings, directory: str | None = None, experiment: str | None = None) -> list[str]:
    """Adapter sources under ``directory`` and/or logged to the MLflow ``experiment`` (oldest first)."""
    if not directory and not experiment:
        raise WatchError("nothing to watch: give a directory (LORALINE_WATCH_DIRECTORY) or an MLflow experiment "
                         "(LORALINE_WATCH_EXPERIMENT)")
    out: list[str] = []
    if directory:
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise WatchError(f"watched directory {directory!r} does not exist; create it or fix LORALINE_WATCH_DIRECTORY")
        out += [str(d) for d in _dirs(root)]
    if experiment:
        out += _runs(experiment, settings)
    return out


def scan(sources: list[str], name: str, settings: Settings) -> list[Candidate]:
    """Digest each source and say whether ``name`` has released it."""
    t = connect(settings)
    seen: dict[str, str] = {}
    out = []
    for src in sources:
        try:
            sha = adapter_digest(Path(src)) if not src.startswith("runs:/") else fetch_adapter(src, settings).sha256
        except LoralineError as e:
            out.append(Candidate(src, "invalid", detail=str(e)))
            continue
        if sha in seen:
            out.append(Candidate(src, "duplicate", sha, detail=f"same adapter digest as {seen[sha]}"))
            continue
        seen[sha] = src
        versions = t.find_versions(name=name, adapter_sha=sha) if _has_model(t, name) else []
        if versions:
            out.append(Candidate(src, "released", sha, str(versions[0].version), f"models:/{name}/{versions[0].version}"))
        else:
            out.append(Candidate(src, "new", sha))
    return out


def _has_model(t: Tracking, name: str) -> bool:
    try:
        t.client.get_registered_model(name)
        return True
    except TrackingError as e:
        if e.error_code in SERVER_FAILED:
            raise
        return False
