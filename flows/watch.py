"""The ``watch`` flow (a scheduled deployment): release every adapter digest not yet released. Wiring only.

Idempotent: releases are keyed on the adapter digest, so a digest released by an earlier run (or
twice in one directory) is reported, not released again.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from loraline.errors import WatchError
from loraline.params import BenchmarkWorkload, GateThresholds, ImageMode
from loraline.settings import Settings
from loraline.watch import Candidate, adapter_sources, scan
from loraline_flows.common import artifact_key, flow_settings
from loraline_flows.release import release


@task(name="scan", cache_policy=NO_CACHE, task_run_name="scan-{name}")
def scan_task(name: str, directory: str | None, experiment: str | None, settings: Settings) -> list[Candidate]:
    return scan(adapter_sources(settings, directory, experiment), name, settings)


@flow(name="watch", flow_run_name="watch-{name}", log_prints=True)
def watch(base: str, name: str = "smol-sql", directory: str | None = None, experiment: str | None = None,
          image: ImageMode | None = None, benchmark: BenchmarkWorkload | None = None,
          gate: GateThresholds | None = None) -> list[dict[str, Any]]:
    """Find adapters newly written to a directory or logged to an MLflow experiment, and release each new digest.

    Args:
        base: base model source every found adapter is released on (a local dir or hf://ORG/NAME@REV).
        name: the registered model the adapters are released as.
        directory: a directory scanned for adapter dirs (holding adapter_config.json), up to 3 levels deep.
        experiment: an MLflow experiment whose finished runs' artifact folders holding adapter_config.json are adapters.
        image: serving image mode for each release (empty: LORALINE_IMAGE).
        benchmark: benchmark workload for each release (empty: LORALINE_BENCH_*).
        gate: gate thresholds for each release (empty: the defaults).
    """
    settings = flow_settings()
    logger = get_run_logger()
    found = scan_task(name, directory, experiment, settings)
    rows, failed = [], []
    for c in found:
        row = c.to_dict()
        if c.state == "new":
            try:
                out = release(adapter=c.source, base=base, name=name, image=image, benchmark=benchmark, gate=gate)
                row.update(state="released now", model_version=str(out["model_version"]),
                           detail="gate " + ("passed" if out["gate"]["passed"] else "failed"))
            except Exception as e:  # noqa: BLE001 - one bad adapter does not stop the others; the run fails at the end
                row.update(state="release failed", detail=str(e))
                failed.append(c.source)
        logger.info("%s: %s %s", c.source, row["state"], row.get("model_version") or row["detail"])
        rows.append(row)
    create_table_artifact(key=artifact_key("watch", name), table=rows or [{"source": "(none found)", "state": ""}],
                          description=f"Adapters found for {name} and what the watch did with each")
    if failed:
        raise WatchError(f"{len(failed)} release(s) failed: {', '.join(failed)} (see the table artifact watch-{name})")
    return rows
