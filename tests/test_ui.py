"""What users see in the Prefect and MLflow UIs, in a real headless Chromium (Debian's chromium + chromedriver,
driven by Selenium; `make setup` installs them). Screenshots go to test-artifacts/screenshots/.

On the services of fixture `prefect_services`: the release deployment's finished run and its model version are looked
at here, test_deployments.py's when it ran first, else one this file starts under a name of its own."""

from __future__ import annotations

from typing import Any

import pytest

from browser import chromium_available, click_text, close_mlflow_assistant, foreign_requests, input_values, open_browser, \
    screenshot, scroll_to_text, wait_for_text

NAME = "smol-sql"
pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def released(prefect_services) -> Any:
    """The release deployment's finished run, with its model name and version: test_deployments.py's when it ran first,
    else one started here through the API under a name of its own (so that test file, run later, still releases v1)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, \
        FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert chromium_available() is None, chromium_available()
    with temporary_settings(updates={PREFECT_API_URL: prefect_services.api_url}), get_client(sync_client=True) as c:
        done = c.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["release"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))))
        run = done[0] if done else run_deployment(name="release/release", parameters={"name": f"{NAME}-ui"}, timeout=900,
                                                  poll_interval=2)
        assert run.state.is_completed(), run.state
        dep = c.read_deployment_by_name("release/release")
        run = c.read_flow_run(run.id)
        return prefect_services, run, dep, run.parameters["name"]


def test_prefect_ui_shows_the_deployment_form_and_the_finished_run(released) -> None:
    s, run, dep, name = released
    with open_browser() as drv:
        # The deployment page, then its run form: the typed parameters with their descriptions and demo defaults.
        drv.get(f"{s.prefect_url}/deployments/deployment/{dep.id}")
        wait_for_text(drv, ["release", "loraline", "Ready"], name="prefect-deployment")
        screenshot(drv, "prefect-deployment")
        drv.get(f"{s.prefect_url}/deployments/deployment/{dep.id}/run")
        wait_for_text(drv, ["Parameters", "adapter", "benchmark (Optional)", "Benchmark workload", "Prompt length, tokens",
                            "gate (Optional)", "Gate thresholds", "Min Parity Identical (Optional)", "Submit"],
                      name="prefect-run-form")
        values = input_values(drv)
        assert NAME in values and any(str(s.demo.checkpoint) in v for v in values), values
        screenshot(drv, "prefect-run-form")

        # The finished release run: its name carries the version, its state, its report artifact.
        drv.get(f"{s.prefect_url}/runs/flow-run/{run.id}")
        wait_for_text(drv, [run.name, "Completed", "Finished in state Completed()"], name="prefect-flow-run")
        assert run.name == f"release-{name}-v1"
        screenshot(drv, "prefect-flow-run")
        click_text(drv, "Artifacts", within="[role=tablist]")
        wait_for_text(drv, [f"release-{name}", f"lineage-{name}"], name="prefect-flow-run-artifacts")
        screenshot(drv, "prefect-flow-run-artifacts")
        click_text(drv, f"release-{name}")
        wait_for_text(drv, [f"Release {name} v1", "Lineage", "Parity", "Gate", "candidate"], name="prefect-report")
        screenshot(drv, "prefect-report")


def test_mlflow_ui_shows_the_model_version_with_its_lineage(released) -> None:
    from mlflow import MlflowClient

    s, _run, _dep, name = released
    mv = MlflowClient(s.mlflow_url, s.mlflow_url).get_model_version(name, "1")
    adapter_sha = mv.tags["loraline.adapter.sha256"]
    with open_browser() as drv:
        drv.get(f"{s.mlflow_url}/#/models/{name}/versions/1")
        close_mlflow_assistant(drv)
        wait_for_text(drv, ["Version 1", "champion", "candidate", "loraline.adapter.sha256", adapter_sha,
                            "loraline.merged.sha256", mv.tags["loraline.merged.sha256"], "loraline.gate", "Gate passed",
                            f"loraline trace models:/{name}/1"], name="mlflow-version")
        screenshot(drv, "mlflow-version")
        scroll_to_text(drv, "loraline.merged.sha256")
        screenshot(drv, "mlflow-version-tags")


def test_the_uis_ask_nothing_of_other_hosts(released) -> None:
    """The UIs as a user opens them (the root URLs): every request the browser makes goes to 127.0.0.1 (the Prefect
    server of `services up` defaults to its V1 UI: V2 loads Amplitude analytics whatever the settings say)."""
    s, _run, _dep, name = released
    with open_browser(record_network=True) as drv:
        drv.get(f"{s.prefect_url}/")
        wait_for_text(drv, ["Dashboard", "Deployments"], name="prefect-home")
        assert "/v2" not in drv.current_url, drv.current_url
        drv.get(f"{s.prefect_url}/deployments")
        wait_for_text(drv, ["release", "watch", "trace"], name="prefect-deployments")
        screenshot(drv, "prefect-deployments")
        drv.get(f"{s.mlflow_url}/#/models")
        close_mlflow_assistant(drv)
        wait_for_text(drv, [name], name="mlflow-models")
        assert foreign_requests(drv) == []
