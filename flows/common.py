"""Small helpers the flows share. Wiring only."""

from __future__ import annotations

import re
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

from prefect import get_run_logger
from pydantic import SecretStr

from loraline.records import version_step
from loraline.services import configured
from loraline.settings import Settings
from loraline.stores import init_once, store_key

# Prefect Secret blocks a flow reads a secret from when the environment does not set it.
SECRET_BLOCKS = {"hf_token": "loraline-hf-token", "registry_password": "loraline-registry-password",
                 "mlflow_tracking_password": "loraline-mlflow-password", "s3_secret_access_key": "loraline-s3-secret-key"}


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def progress(step: str) -> Callable[[str], None]:
    """A progress callback for minutes-long steps: Prefect's run log (the UI) and stderr."""
    logger = get_run_logger()

    def say(msg: str) -> None:
        logger.info(msg)
        sys.stderr.write(f"loraline {step}: {msg}\n")  # not print(): log_prints would route it to the logger only
        sys.stderr.flush()

    return say


def flow_settings() -> Settings:
    """The settings a flow runs with: the environment (LORALINE_*), the services of `loraline services up` where unset,
    and each secret the environment leaves unset from its Prefect Secret block (:data:`SECRET_BLOCKS`), if that exists.
    Secrets stay ``SecretStr``: never logged, never in a flow's parameters."""
    from prefect.blocks.system import Secret

    settings = configured(Settings())
    update = {}
    for field, block in SECRET_BLOCKS.items():
        if getattr(settings, field) is not None:
            continue
        try:
            update[field] = SecretStr(str(Secret.load(block).get()))
        except ValueError:  # no such block
            continue
    return settings.model_copy(update=update) if update else settings


def failing(name: str, version: str, step: str, settings: Settings) -> AbstractContextManager[None]:
    """:func:`loraline.records.version_step` with MLflow's own failure to record it in the run log (the UI)."""
    return version_step(name, version, step, settings, warn=get_run_logger().error)


def name_flow_run(name: str) -> None:
    """Rename the running flow run (e.g. once the model version is known): the UI's runs list shows it."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)


def start_prefect_api(settings: Settings) -> None:
    """Start Prefect's ephemeral API server now when no Prefect server is configured (``PREFECT_API_URL`` unset).

    Each ephemeral server migrates its SQLite database (``<home>/prefect/prefect.db``) and registers the block types
    when it starts, and nothing serializes that across processes: the first start on a fresh database runs once
    (:func:`loraline.stores.init_once`), the others wait for it. The server is Prefect's per-process singleton, so the
    flow this process runs next uses it (no second start).
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    prefect = get_current_settings()
    if prefect.api.url or not prefect.server.ephemeral.enabled:
        return
    url = prefect.server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    if not url.startswith("sqlite"):
        SubprocessASGIServer().start()
        return
    database = Path(url.split(":///", 1)[-1])
    init_once(settings.home, store_key("prefect", str(database)), lambda: SubprocessASGIServer().start(),
              exists=database.is_file)
    SubprocessASGIServer().start()  # started above by this process, or now on a database another one initialized
