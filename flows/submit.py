"""``loraline release --submit``: a flow run of the deployment ``release/release`` on the work pool, followed to its end
(state changes, the worker that took it, the run's log lines on stderr), then the release's record. Wiring only."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

from loraline.errors import LoralineError
from loraline.settings import Settings
from loraline.trace import release_of
from loraline.resume import with_image

DEPLOYMENT = "release/release"
POLL_S = 2.0


def _say(msg: str) -> None:
    sys.stderr.write(f"loraline submit: {msg}\n")
    sys.stderr.flush()


def submit_release(parameters: dict[str, Any], settings: Settings, api_url: str) -> dict[str, Any]:
    """Create the flow run, follow it, and return the release's JSON (as ``loraline release --json`` prints it) with
    ``flow_run`` {id, name, worker, state}. A run that does not complete raises with its state and message."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.deployments import run_deployment

    run = run_deployment(DEPLOYMENT, parameters=parameters, timeout=0, as_subflow=False)
    ui = api_url.removesuffix("/api")
    _say(f"flow run {run.name} ({run.id}) of {DEPLOYMENT} on work pool {run.work_pool_name}: {ui}/runs/flow-run/{run.id}")
    seen: tuple[str | None, str | None] = (None, None)
    logs_read = 0
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run.id)
            worker = (run.labels or {}).get("prefect.worker.name")
            if (run.state_name, worker) != seen:
                seen = (run.state_name, worker)
                _say(f"{run.state_name}" + (f" on worker {worker}" if worker else ""))
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), offset=logs_read,
                                    sort=LogSort.TIMESTAMP_ASC)
            for line in logs:
                sys.stderr.write(f"  {line.message}\n")
            logs_read += len(logs)
            if run.state is not None and run.state.is_final():
                break
            time.sleep(POLL_S)
    flow_run = {"id": str(run.id), "name": run.name, "worker": worker, "state": run.state_name}
    if not run.state.is_completed():
        raise LoralineError(f"the release's flow run {run.name} ({run.id}) ended {run.state_name}: "
                            f"{run.state.message or 'no message'} (its log: {ui}/runs/flow-run/{run.id})")
    version = _version(run.name, parameters["name"])
    if version is None:
        raise LoralineError(f"the release's flow run {run.name} ({run.id}) completed without naming a model version")
    lineage = release_of(f"models:/{parameters['name']}/{version}", settings)
    mode = parameters.get("image") or next((i.get("mode") for i in reversed(lineage.get("images", []))), None)
    return {**with_image(lineage, mode), "flow_run": flow_run}


def _version(run_name: str, name: str) -> str | None:
    """The model version a release's flow run names itself after (``release-NAME-vN`` or ``...-existing``)."""
    m = re.fullmatch(rf"release-{re.escape(name)}-v(\d+)(-existing)?", run_name)
    return m.group(1) if m else None
