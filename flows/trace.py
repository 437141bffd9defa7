"""The stand-alone ``trace`` flow: the whole chain of a release, from any end, as a Prefect artifact. Wiring only."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from loraline.report import lineage_rows
from loraline.trace import trace as trace_ref
from loraline_flows.common import artifact_key, flow_settings


@flow(name="trace", flow_run_name="trace-{ref}", log_prints=True)
def trace(ref: str) -> dict[str, Any]:
    """Trace a release chain back to the adapter checkpoint, and forward to its serving images.

    Args:
        ref: models:/NAME/VERSION, models:/NAME@ALIAS, an adapter directory, an adapter or merged-model sha256, or a
            serving image HOST:PORT/NAME:TAG or HOST:PORT/NAME@sha256:DIGEST (its labels are read from the registry).
    """
    settings = flow_settings()
    chain = trace_ref(ref, settings)
    name, version = chain["model_name"], chain["model_version"]
    rows = lineage_rows(chain)
    create_table_artifact(key=artifact_key("trace", name), table=rows, description=f"{ref} traced: models:/{name}/{version}")
    md = [f"# {ref}", "", f"is `models:/{name}/{version}` (aliases: {', '.join(chain.get('aliases') or []) or 'none'}, "
          f"status {chain.get('status')}); {len(chain['chains'])} release chain(s).", "",
          "| step | what | sha256 |", "|---|---|---|"] + [f"| {r['step']} | `{r['what']}` | `{r['sha256']}` |" for r in rows]
    create_markdown_artifact(key=artifact_key("trace-report", name), markdown="\n".join(md), description=f"Trace of {ref}")
    return chain
