"""Small helpers the flows share. Wiring only."""

from __future__ import annotations

import re
import sys
from typing import Callable

from prefect import get_run_logger


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


def name_flow_run(name: str) -> None:
    """Rename the running flow run (e.g. once the model version is known): the UI's runs list shows it."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)
