"""MLflow, the one seam: its client, the release record (``lineage.json``), and MLflow's failures as our errors.

Everything that talks to MLflow (registration, gate, trace, watch, MLflow sources) starts with :func:`connect`::

    t = connect(settings)      # MLflow (fluent API included) pointed at the configured stores
    t.client.get_model_version(name, version)   # any MlflowClient call; its failures arrive as TrackingError
    t.lineage(run_id)          # a release's lineage.json
    t.update_lineage(run_id, evaluation={...})  # read, change, write back: one place

A failing MLflow call raises :class:`~loraline.errors.TrackingError` with one line a user can act on (the server does
not answer, refused the credentials, or what MLflow said) and MLflow's ``error_code`` (``RESOURCE_DOES_NOT_EXIST``,
``RESOURCE_ALREADY_EXISTS``, ...) for callers that decide on it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from loraline.errors import RegistryError, SettingsError, TrackingError
from loraline.settings import Settings, redact
from loraline.stores import init_once, store_key

TAG = "loraline."  # the namespace of every tag loraline sets on runs, versions and experiments
LINEAGE_FILE = "lineage.json"
# Store URI schemes MLflow 3 accepts (mlflow.tracking._tracking_service.utils); +driver suffixes are allowed.
MLFLOW_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
EXISTS = "RESOURCE_ALREADY_EXISTS"
# The call never got an answer, or the server refused who we are: nothing about what was asked can be concluded.
UNAVAILABLE, UNAUTHENTICATED, PERMISSION_DENIED = "TEMPORARILY_UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED"
SERVER_FAILED = (UNAVAILABLE, UNAUTHENTICATED, PERMISSION_DENIED)


def failure(e: BaseException, where: str = "") -> TrackingError | None:
    """MLflow's exception ``e`` as a :class:`TrackingError` (None when ``e`` is not MLflow's): a server that does not
    answer or refuses the credentials gets the fix; anything else keeps MLflow's message."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return None
    text = str(e)
    code = str(getattr(e, "error_code", "") or "")
    m = re.search(r"(https?://[^/\s]+)", text)
    at = f" at {m.group(1)}" if m else (f" ({where})" if where else "")
    if "Max retries exceeded" in text or "Connection refused" in text or "ConnectionError" in text:
        msg, code = (f"the MLflow server{at} does not answer: start it again (`loraline services up`, or your server) and "
                     "re-run: the re-run continues the same release (nothing half-registered is kept)"), UNAVAILABLE
    elif "error code 401" in text or text.startswith("401 "):
        msg, code = ("the MLflow server refused the request (401: not authenticated): set MLFLOW_TRACKING_USERNAME and "
                     "MLFLOW_TRACKING_PASSWORD, or the Prefect Secret block loraline-mlflow-password"), UNAUTHENTICATED
    elif "error code 403" in text or text.startswith("403 "):
        msg, code = ("the MLflow server refused the request (403: permission denied): give MLFLOW_TRACKING_USERNAME EDIT "
                     "(or MANAGE) on the experiment and the registered model, or use another user"), PERMISSION_DENIED
    else:
        msg = getattr(e, "message", None) or text
    return TrackingError(msg, error_code=code)


class _Client:
    """An ``MlflowClient`` whose calls raise :class:`TrackingError` instead of MLflow's exceptions."""

    def __init__(self, client: Any, where: str) -> None:
        self._client, self._where = client, where

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                if (err := failure(e, self._where)) is None:
                    raise
                raise err from e

        return call


class Tracking:
    """The MLflow client of one configuration, and the release record read and written in one place."""

    def __init__(self, settings: Settings, client: Any) -> None:
        self.settings = settings
        self.client = _Client(client, self.where)

    @property
    def where(self) -> str:
        return redact(self.settings.resolved_tracking_uri)

    def lineage(self, run_id: str) -> dict[str, Any]:
        """The ``lineage.json`` artifact of a release run."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.client.download_artifacts(run_id, LINEAGE_FILE, tmp)
            except TrackingError as e:
                if e.error_code in SERVER_FAILED:  # not "no such file"
                    raise
                raise TrackingError(f"MLflow run {run_id} has no {LINEAGE_FILE}: it was not made by a loraline release ({e})",
                                    error_code=NOT_FOUND) from e
            except OSError as e:  # a file store: the artifact is not there
                raise TrackingError(f"MLflow run {run_id} has no {LINEAGE_FILE}: it was not made by a loraline release ({e})",
                                    error_code=NOT_FOUND) from e
            return json.loads(Path(local).read_text())

    def update_lineage(self, run_id: str, change: Callable[[dict[str, Any]], None] | None = None,
                       **sections: Any) -> dict[str, Any]:
        """Read a release's ``lineage.json``, set ``sections`` (and apply ``change``), write it back; returns it."""
        lineage = self.lineage(run_id)
        lineage.update(sections)
        if change is not None:
            change(lineage)
        self.log_texts(run_id, {LINEAGE_FILE: json.dumps(lineage, indent=2)})
        return lineage

    def log_texts(self, run_id: str, files: Mapping[str, str], artifact_path: str | None = None,
                  extra: tuple[Path, ...] = ()) -> None:
        """Log text files (name -> content), and the files ``extra``, as artifacts of ``run_id``."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                p = Path(tmp) / name
                p.write_text(text)
                self.client.log_artifact(run_id, str(p), artifact_path)
        for f in extra:
            self.client.log_artifact(run_id, str(f), artifact_path)

    def experiment_id(self, name: str) -> str:
        """One experiment per registered model, named after it; artifacts under ``<home>/mlartifacts`` for local stores."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        s = self.settings
        location = (s.artifact_root / name).as_uri() if _is_local_store(s.resolved_tracking_uri) else None
        try:
            return str(self.client.create_experiment(name, artifact_location=location, tags={f"{TAG}model": name}))
        except TrackingError:
            exp = self.client.get_experiment_by_name(name)  # created concurrently by another release
            if exp is None:
                raise
            return str(exp.experiment_id)

    def find_versions(self, *, adapter_sha: str | None = None, base_sha: str | None = None, name: str | None = None,
                      merged_sha: str | None = None, gguf_sha: str | None = None) -> list[Any]:
        """Model versions carrying the given lineage digests (``gguf_sha``: of the .gguf file a base was converted
        from), oldest first."""
        clauses = []
        if name:
            clauses.append(f"name = '{name}'")
        for key, val in (("adapter", adapter_sha), ("base", base_sha), ("merged", merged_sha), ("base.gguf", gguf_sha)):
            if val:
                if not re.fullmatch(r"[0-9a-f]{64}", val):
                    raise RegistryError(f"{key} digest {val!r} is not a sha256 hex digest (64 characters 0-9a-f)")
                clauses.append(f"tags.`{TAG}{key}.sha256` = '{val}'")
        versions = self.client.search_model_versions(" and ".join(clauses), max_results=1000)
        return sorted(versions, key=lambda v: (v.name, int(v.version)))

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, version).tags or {})


def connect(settings: Settings) -> Tracking:
    """Point MLflow (fluent API included) at the configured tracking and registry URIs; a :class:`Tracking` on them."""
    import mlflow
    from mlflow import MlflowClient

    settings.ensure_dirs()
    for what, uri in (("LORALINE_TRACKING_URI", settings.resolved_tracking_uri), ("LORALINE_REGISTRY_URI", settings.resolved_registry_uri)):
        scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
        if scheme and scheme not in MLFLOW_SCHEMES:
            raise SettingsError(f"{what} {redact(uri)!r}: MLflow does not know the scheme {scheme!r}; use sqlite:///PATH, "
                                "http(s)://HOST:PORT (an MLflow server), postgresql://, mysql:// or file:///PATH")
    # MLflow's REST client reads basic-auth credentials from its environment variables only: hand them over there
    # (from a Prefect Secret block, or LORALINE_MLFLOW_TRACKING_*); they never go into params, tags or logs.
    if settings.mlflow_tracking_username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = settings.mlflow_tracking_username
    if settings.mlflow_tracking_password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = settings.mlflow_tracking_password.get_secret_value()
    for uri in dict.fromkeys((settings.resolved_tracking_uri, settings.resolved_registry_uri)):
        if uri.lower().startswith("sqlite:"):
            _init_sqlite_store(uri, settings)
    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    mlflow.set_registry_uri(settings.resolved_registry_uri)
    return Tracking(settings, MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri))


def _init_sqlite_store(uri: str, settings: Settings) -> None:
    """Create a SQLite store's schema once across processes (:func:`loraline.stores.init_once`).

    MLflow migrates an empty database when a store first opens it, with nothing that serializes processes: releases
    started at once on a fresh home failed in alembic ("Online migration expected to match one row ...").
    """
    from mlflow import MlflowClient
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return

    def initialize() -> None:
        client = MlflowClient(uri, uri)
        client.search_experiments(max_results=1)  # the tracking store creates and migrates every table
        client.search_registered_models(max_results=1)  # the registry store checks its own

    init_once(settings.home, store_key("mlflow", uri), initialize, exists=Path(database).is_file)


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
