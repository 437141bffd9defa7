"""The deployments users drive from the Prefect UI, against a real `prefect server start`, the runner of
`loraline services up` (`python -m loraline_flows.serve`) and a real MLflow server (fixture `prefect_services`)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow import MlflowClient
from helpers import adapter_version

NAME = "smol-sql"


def prefect(api_url: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api_url})


def artifacts_of(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def run_button(deployment: str, parameters: dict[str, Any] | None = None, timeout: float = 900):
    """What the UI's Run button does: a flow run created from the deployment (its defaults unless overridden), which
    the runner picks up; wait for its final state."""
    from prefect.deployments import run_deployment

    return run_deployment(name=deployment, parameters=parameters or {}, timeout=timeout, poll_interval=2)


def test_deployments_have_typed_forms_with_demo_defaults(prefect_services) -> None:
    from prefect.client.orchestration import get_client

    with prefect(prefect_services.api_url), get_client(sync_client=True) as c:
        rel = c.read_deployment_by_name("release/release")
        schema = rel.parameter_openapi_schema
        props = schema["properties"]
        assert schema["required"] == ["adapter", "base", "name"]
        assert "adapter source" in props["adapter"]["description"] and "registered model name" in props["name"]["description"]
        defs = schema["definitions"]
        workload, gate = defs["BenchmarkWorkload"], defs["GateThresholds"]
        assert workload["title"] == "Benchmark workload" and gate["title"] == "Gate thresholds"
        assert workload["properties"]["concurrency"]["description"].startswith("OpenAI-server concurrency levels")
        assert gate["properties"]["min_parity_identical"]["default"] == 0.5
        champion = gate["properties"]["champion_tolerance"]
        assert champion["default"] == 0.0 and champion["description"].startswith("Champion–challenger: the release's task accuracy")
        assert set(props["image"]["anyOf"][0]["enum"]) == {"merged", "lora", "gguf", "none"}
        # The form opens with the demo's parameters filled in.
        assert rel.parameters["adapter"] == str(prefect_services.demo.checkpoint)
        assert rel.parameters["base"] == str(prefect_services.demo.base)
        assert rel.parameters["name"] == NAME and rel.parameters["benchmark"]["run"] is False
        for name in ("benchmark/benchmark", "image/image", "trace/trace"):
            d = c.read_deployment_by_name(name)
            assert d.parameters and d.description and "loraline" in d.tags, name
        watch = c.read_deployment_by_name("watch/watch")
        assert watch.parameters["directory"] == str(prefect_services.watch_dir)
        (sched,) = watch.schedules
        assert sched.active and sched.schedule.interval.total_seconds() == 20


def test_run_button_releases_and_publishes_the_report(prefect_services) -> None:
    s = prefect_services
    with prefect(s.api_url):
        run = run_button("release/release")
        assert run.state.is_completed(), run.state
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as c:
            run = c.read_flow_run(run.id)
            tasks = {t.name.rsplit("-", 1)[0] if t.name.startswith(("fetch", "validate", "merge", "parity")) else t.name
                     for t in c.read_task_runs(flow_run_filter=_by_id(run.id))}
        assert run.name == f"release-{NAME}-v1"  # renamed once the version was known
        assert {f"register-{NAME}", f"gate-{NAME}-v1", f"report-{NAME}-v1"} <= tasks, tasks
        arts = artifacts_of(run.id)
        assert {f"release-{NAME}", f"lineage-{NAME}"} <= set(arts), set(arts)
        report = arts[f"release-{NAME}"].data

    client = MlflowClient(s.mlflow_url, s.mlflow_url)
    mv = client.get_model_version(NAME, "1")
    exp_id = client.get_run(mv.run_id).info.experiment_id
    # The report: lineage chain, parity, gate, links into the MLflow UI of the server the run used.
    assert "# Release smol-sql v1" in report and mv.tags["loraline.adapter.sha256"][:16] in report
    assert f"{s.mlflow_url}/#/models/{NAME}/versions/1" in report
    assert f"{s.mlflow_url}/#/experiments/{exp_id}/runs/{mv.run_id}" in report
    assert "## Parity" in report and "**passed**; aliases moved: `candidate` → v1, `champion` → v1" in report
    table = json.loads(arts[f"lineage-{NAME}"].data) if isinstance(arts[f"lineage-{NAME}"].data, str) else arts[f"lineage-{NAME}"].data
    assert [r["step"] for r in table] == ["adapter", "base", "merged", "model version"]
    # MLflow holds the version, its lineage tags, the gate's aliases, the report.
    assert mv.tags["loraline.adapter.source"] == str(s.demo.checkpoint) and mv.tags["loraline.gate"] == "passed"
    assert {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()} == {"candidate": "1", "champion": "1"}
    assert "loraline trace models:/smol-sql/1" in mv.description and "Gate passed" in mv.description
    assert client.get_experiment(exp_id).name == NAME
    assert client.get_run(mv.run_id).info.run_name.startswith(f"{NAME}-v1 adapter ")
    assert "report.md" in {a.path for a in client.list_artifacts(mv.run_id)}

    # The trace deployment, from the champion alias, back to the checkpoint.
    with prefect(s.api_url):
        tr = run_button("trace/trace")
        assert tr.state.is_completed(), tr.state
        rows = artifacts_of(tr.id)[f"trace-{NAME}"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert rows[0]["what"] == str(s.demo.checkpoint) and rows[0]["sha256"] == mv.tags["loraline.adapter.sha256"]


def _by_id(flow_run_id: Any):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


def _watch_runs(after: float) -> list[Any]:
    """Finished scheduled (not manually started) watch runs that ended after ``after`` (epoch seconds): the runs whose
    scan may have seen what was written at ``after`` — one that started just before it may be the one that releases
    (seen: every run that started after the write then found the digest released by such a run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, \
        FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as c:
        runs = c.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["watch"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]))))
    return sorted((r for r in runs if r.auto_scheduled and r.start_time and r.end_time and r.end_time.timestamp() > after),
                  key=lambda r: r.start_time)


@pytest.fixture()
def watch_schedule(prefect_services) -> Iterator[SimpleNamespace]:
    """The watch deployment on its 20 s schedule, paused (its scheduled runs deleted) when the test is done: each run is
    a process, and the session's later tests share the cores with them (84 ran in one CI session before this)."""
    from prefect.client.orchestration import get_client

    try:
        yield prefect_services
    finally:
        with prefect(prefect_services.api_url), get_client(sync_client=True) as c:
            c.pause_deployment(c.read_deployment_by_name("watch/watch").id)


def test_watch_schedule_releases_each_new_digest_once(watch_schedule) -> None:
    s = watch_schedule
    client = MlflowClient(s.mlflow_url, s.mlflow_url)
    # Written to the watched directory: a new adapter version, and the same one again (a duplicate digest).
    adapter_version(s.demo.checkpoint, s.watch_dir / "run-7" / "checkpoint-200")
    shutil.copytree(s.watch_dir / "run-7" / "checkpoint-200", s.watch_dir / "copy-of-200")
    t0 = time.time()
    deadline = t0 + 600
    with prefect(s.api_url):
        released: Any = None
        while time.time() < deadline:
            runs = _watch_runs(t0)
            for r in runs:
                assert r.state.is_completed(), (r.name, r.state)
                table = artifacts_of(r.id)[f"watch-{NAME}"].data
                table = json.loads(table) if isinstance(table, str) else table
                if released is None and any(row["state"] == "released now" for row in table):
                    released = (r, table)
            if released and [r for r in runs if r.start_time > released[0].start_time]:
                break  # one more scheduled run after the release: it must find nothing new
            time.sleep(5)
        assert released, f"no scheduled watch run released the new adapter within 600 s: {[(r.name, r.state.name) for r in _watch_runs(t0)]}"
        run, table = released
        later = [r for r in _watch_runs(t0) if r.start_time > run.start_time]
        assert later, "no scheduled watch run after the one that released"
        later_table = artifacts_of(later[0].id)[f"watch-{NAME}"].data
    later_table = json.loads(later_table) if isinstance(later_table, str) else later_table
    states = {Path(row["source"]).name: row["state"] for row in table}
    # The same digest twice: one released, the other reported as its duplicate (whichever the scan met first).
    assert sorted([states["checkpoint-200"], states["copy-of-200"]]) == ["duplicate", "released now"], table
    # Idempotent: the next scheduled run finds the digest released, and nothing new is registered.
    later_states = sorted(row["state"] for row in later_table if Path(row["source"]).name in ("checkpoint-200", "copy-of-200"))
    assert later_states == ["duplicate", "released"], later_table
    assert not any(row["state"] == "released now" for row in later_table)
    versions = client.search_model_versions(f"name = '{NAME}'")
    shas = [v.tags["loraline.adapter.sha256"] for v in versions]
    assert len(shas) == len(set(shas))  # one version per digest
    assert {row["sha256"] for row in table if row["state"] == "released now"} <= set(shas)


def test_prefect_yaml_deploys_the_same_flows_with_valid_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """prefect.yaml (production: `prefect deploy --all` to the work pool; `services up --production` deploys it) names
    real flows by module path (no checkout needed where the workers run), and its parameters pass those flows'
    validation (what `prefect deploy` and the worker check)."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    spec = yaml.safe_load((repo / "prefect.yaml").read_text())
    assert spec["pull"] == []  # nothing to pull: the workers have loraline installed
    assert (repo / "prefect.yaml").resolve() == repo / "src" / "loraline" / "data" / "prefect" / "prefect.yaml"
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"release", "benchmark", "image", "trace", "watch"}
    for d in spec["deployments"]:
        assert d["work_pool"]["name"] == "loraline", d["name"]
        assert d["entrypoint"] == f"loraline_flows.{d['name']}.{d['name']}"
        fl = load_flow_from_entrypoint(d["entrypoint"])
        assert fl.name == d["name"]
        params = {k: ("/data/base" if isinstance(v, str) and v.startswith("{{") else v) for k, v in d["parameters"].items()}
        if d["name"] == "release":
            params |= {"adapter": "/data/checkpoint-100", "base": "/data/base"}
        fl.validate_parameters(params)  # raises on a wrong name or type
    watch = next(d for d in spec["deployments"] if d["name"] == "watch")
    assert watch["schedules"] == [{"interval": 300}] and watch["concurrency_limit"] == 1


K8S_IMAGE = "registry.example.com/loraline-worker:0.1.0"
K8S_SECRETS = {"LORALINE_HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LORALINE_REGISTRY_PASSWORD",
               "MLFLOW_TRACKING_PASSWORD"}


def test_kubernetes_job_template_is_accepted_by_prefect_and_renders_the_gpu_job(prefect_api_url: str, tmp_path: Path) -> None:
    """The Kubernetes work pool's base job template (package data, README "Production"): Prefect's server accepts it for
    a `kubernetes` pool created with the README's command (prefect-kubernetes is not needed for that) and stores it,
    rejects the same template with an undeclared placeholder or a default of the wrong type, validates a release
    deployment's job variables against it, and resolves them (as a worker does) into a Job with the image, the GPUs and
    the secrets as secretKeyRef only."""
    import asyncio
    import copy
    import os
    import subprocess
    import sys
    import uuid
    from importlib.resources import files

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.utilities.templating import find_placeholders
    from prefect.workers.base import BaseJobConfiguration

    packaged = files("loraline") / "data" / "prefect" / "kubernetes-job-template.json"
    template = json.loads(packaged.read_text())
    props = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    assert used == set(props)  # every placeholder declared (the server's check) and every variable used
    assert {"image", "gpu_count", "cpu_request", "memory_request", "secret_name", "namespace", "service_account_name",
            "finished_job_ttl", "loraline_home"} <= used
    assert props["image"]["default"].startswith("loraline-worker.invalid/")  # a placeholder users must replace

    pool = f"loraline-k8s-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "kubernetes-job-template.json"
    spec.write_text(packaged.read_text())
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "work-pool", "create", pool, "--type",
                           "kubernetes", "--base-job-template", str(spec)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    release = next(d for d in yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "release")
    job_variables = {"image": K8S_IMAGE, "gpu_count": 2}
    with prefect(prefect_api_url), get_client(sync_client=True) as c:
        wp = c.read_work_pool(pool)
        assert wp.type == "kubernetes" and wp.base_job_template == template
        bad = copy.deepcopy(template)
        bad["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline_s }}"
        with pytest.raises(PrefectHTTPStatusError, match="undeclared variable.*deadline_s"):
            c.create_work_pool(WorkPoolCreate(name=f"{pool}-bad", type="kubernetes", base_job_template=bad))
        bad = copy.deepcopy(template)
        bad["variables"]["properties"]["gpu_count"]["default"] = "one"
        with pytest.raises(PrefectHTTPStatusError, match="job variable defaults: .* field 'gpu_count'"):
            c.create_work_pool(WorkPoolCreate(name=f"{pool}-bad", type="kubernetes", base_job_template=bad))
        flow_id = c.create_flow_from_name("release")
        with pytest.raises(PrefectHTTPStatusError, match="creating deployment: .* field 'gpu_count'"):
            c.create_deployment(flow_id, f"{pool}-bad", work_pool_name=pool, entrypoint=release["entrypoint"],
                                job_variables={"image": K8S_IMAGE, "gpu_count": "two"})
        dep_id = c.create_deployment(flow_id, f"release-{pool}", work_pool_name=pool, entrypoint=release["entrypoint"],
                                     parameters=release["parameters"], job_variables=job_variables)
        dep = c.read_deployment(dep_id)
        assert dep.work_pool_name == pool and dep.job_variables == job_variables

        class KubernetesJob(BaseJobConfiguration):  # the fields prefect-kubernetes' job configuration adds
            namespace: str
            job_manifest: dict[str, Any]

        job = asyncio.run(KubernetesJob.from_template_and_values(wp.base_job_template, dep.job_variables))
    manifest = job.job_manifest
    assert manifest["spec"]["backoffLimit"] == 0 and manifest["spec"]["ttlSecondsAfterFinished"] == props["finished_job_ttl"]["default"]
    assert job.namespace == manifest["metadata"]["namespace"] == props["namespace"]["default"]
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == props["service_account_name"]["default"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 1
    (ctr,) = pod["containers"]
    assert ctr["image"] == K8S_IMAGE and "args" not in ctr  # the worker adds Prefect's flow-run command as args
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert ctr["resources"]["requests"] == {"cpu": props["cpu_request"]["default"], "memory": props["memory_request"]["default"]}
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    envs = {e["name"]: e for e in ctr["env"]}
    home = props["loraline_home"]["default"]
    assert envs["LORALINE_HOME"] == {"name": "LORALINE_HOME", "value": home}
    assert {m["mountPath"] for m in ctr["volumeMounts"]} >= {home}
    assert K8S_SECRETS <= set(envs)
    for name in K8S_SECRETS:  # from the Kubernetes Secret, never a literal value
        assert envs[name] == {"name": name, "valueFrom": {"secretKeyRef": {
            "name": props["secret_name"]["default"], "key": name, "optional": True}}}, envs[name]
    assert [e["name"] for e in ctr["env"] if "value" in e] == ["LORALINE_HOME"]
