"""The Prefect release flow against a real (temporary) Prefect server and a real SQLite MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from helpers import mlflow_state
from loraline.digest import digest_dir
from loraline.errors import InvalidAdapter
from loraline.settings import Settings


def aliases(client: MlflowClient) -> dict[str, str]:
    """The registered model's aliases, versions as strings (the SQLite store returns ints)."""
    return {k: str(v) for k, v in (client.get_registered_model(NAME).aliases or {}).items()}


NAME = "smol-sql"


def task_runs(flow_state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))


def task_states(flow_state) -> dict[str, str]:
    # Task run names are "<task name>-<suffix>".
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in task_runs(flow_state)}


def test_release_registers_a_traced_version_and_is_idempotent(prefect_harness, demo_assets, settings: Settings) -> None:
    from loraline_flows.release import release

    out = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME)
    assert out["model_name"] == NAME and out["model_version"] == "1" and out["existing"] is False
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["loraline.adapter.sha256"] == out["adapter"]["sha256"] == digest_dir(Path(out["adapter"]["path"]))
    assert mv.tags["loraline.base.sha256"] == out["base"]["sha256"] == digest_dir(demo_assets.base)
    assert mv.tags["loraline.merged.sha256"] == out["merged"]["sha256"] == digest_dir(Path(out["merged"]["path"]))
    assert mv.tags["loraline.adapter.source"] == str(demo_assets.checkpoint)
    assert mv.tags["loraline.run_id"] == out["mlflow_run_id"] == mv.run_id
    assert "loraline trace models:/smol-sql/1" in mv.description
    # The gate passed the first release: both aliases name it, and the version says so.
    assert out["gate"]["passed"] is True and out["gate"]["aliases_moved"] == {"candidate": "1", "champion": "1"}
    assert aliases(client) == {"candidate": "1", "champion": "1"}
    assert mv.tags["loraline.gate"] == "passed" and "Gate passed (candidate -> v1, champion -> v1)" in mv.description

    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("smol-sql-v1 adapter ")
    assert client.get_experiment(run.info.experiment_id).name == NAME
    assert run.data.params["lora.r"] == "8" and run.data.params["adapter.sha256"] == out["adapter"]["sha256"]
    assert run.data.metrics["parity_failed"] == 0 and run.data.metrics["merge_seconds"] > 0
    assert run.data.metrics["merged_bytes"] == out["merged"]["bytes"]
    # The KV-cache plan for the configured device (LORALINE_PLAN_DEVICE, default cpu: the engine's 1 GiB), as vLLM reports it.
    assert run.data.metrics["plan.kv_tokens"] == 2_097_152 and run.data.metrics["plan.max_concurrency"] == 1024
    assert mv.tags["loraline.plan"] == "cpu: 2,097,152 KV tokens, 1024.00x at 2,048 tokens per request (bfloat16 KV, 1.00 GiB)"
    assert out["plan"]["kv_tokens"] == 2_097_152 and out["plan"]["device"] == "cpu"
    # `loraline plan models:/NAME/VERSION` plans the release's merged model; a version that does not exist is refused.
    from loraline.errors import PlanError
    from loraline.plan import model_dir_of

    assert model_dir_of(f"models:/{NAME}/1", settings) == Path(out["merged"]["path"])
    with pytest.raises(PlanError, match=rf"cannot plan models:/{NAME}/7: .*"):
        model_dir_of(f"models:/{NAME}/7", settings)
    # The task evaluation ran on 8 eval questions, merged and base, and is recorded on the run, version and lineage.
    ev = out["evaluation"]
    assert ev["examples"] == 8 and 0 <= ev["accuracy"] <= 1 and ev["gain"] == round(ev["accuracy"] - ev["base_accuracy"], 4)
    assert round(run.data.metrics["eval.accuracy"], 4) == ev["accuracy"] and run.data.metrics["eval.examples"] == 8
    assert mv.tags["loraline.eval.accuracy"] == str(ev["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"lineage.json", "parity.json", "adapter_config.json", "report.md", "gate.json", "evaluation.json"} <= artifacts
    report = Path(client.download_artifacts(run.info.run_id, "report.md")).read_text()
    assert "# Release smol-sql v1" in report and out["adapter"]["sha256"][:16] in report and "**passed**" in report
    assert "## Task evaluation" in report and f"| merged | {ev['accuracy']:.1%}" in report
    lineage = json.loads(Path(client.download_artifacts(run.info.run_id, "lineage.json")).read_text())
    assert lineage["merged"]["sha256"] == out["merged"]["sha256"] and lineage["model_version"] == "1"
    # The demo's plain LoRA is merged straight from the safetensors, and the release says so.
    assert lineage["merged"]["method"] == out["merged"]["method"] == mv.tags["loraline.merged.method"] == "direct"
    assert lineage["merged"]["fallback_reason"] is None
    assert lineage["plan"]["vllm_log_line"].startswith("CPU KV cache size: 2,097,152 tokens")
    # The registered model holds the merged weights, loadable from the registry.
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    (weights,) = (local / "artifacts").iterdir()  # the pyfunc's "weights" artifact
    assert digest_dir(weights) == out["merged"]["sha256"]

    runs_before = len(client.search_runs([run.info.experiment_id]))
    again = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME)
    assert again["existing"] is True and again["model_version"] == "1"
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    assert len(client.search_runs([run.info.experiment_id])) == runs_before


def test_rerun_under_another_name_reuses_the_cached_merge(prefect_harness, demo_assets, settings: Settings) -> None:
    from loraline_flows.release import release

    release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name="first")
    state = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name="second", return_state=True)
    out = state.result()
    assert out["model_name"] == "second" and out["model_version"] == "1"
    states = task_states(state)
    assert states["merge"] == "Cached" and states["parity"] == "Cached", states
    assert states["fetch-adapter"] == "Completed"


def _nan_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    t = load_file(str(dst / "adapter_model.safetensors"))
    k = sorted(t)[0]
    t[k][0, 0] = float("inf")
    save_file(t, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_refused_release_leaves_nothing_behind(prefect_harness, demo_assets, settings: Settings, tmp_path: Path) -> None:
    from loraline_flows.release import release

    bad = _nan_adapter(demo_assets.checkpoint, tmp_path / "bad")
    with pytest.raises(InvalidAdapter, match="NaN/Inf"):
        release(adapter=str(bad), base=str(demo_assets.base), name=NAME)
    assert mlflow_state(settings) == {"versions": [], "aliases": [], "running": []}
    assert not settings.merged_dir.exists() or not list(settings.merged_dir.iterdir())  # refused before merging


def test_failure_during_registration_rolls_back(prefect_harness, demo_assets, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault injected after the model version exists (lineage.json upload fails): the version is deleted, the run FAILED."""
    import mlflow

    from loraline_flows.release import release

    real = mlflow.log_dict

    def failing_log_dict(d, artifact_file, *a, **k):  # fault injection, not a stand-in: MLflow itself stays real
        if artifact_file == "lineage.json":
            raise OSError("disk full (injected)")
        return real(d, artifact_file, *a, **k)

    monkeypatch.setattr(mlflow, "log_dict", failing_log_dict)
    with pytest.raises(OSError, match="injected"):
        release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name="rollback")
    state = mlflow_state(settings)
    assert state["versions"] == [] and state["running"] == [] and state["aliases"] == []
    client = MlflowClient(settings.resolved_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("rollback").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    monkeypatch.setattr(mlflow, "log_dict", real)
    out = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name="rollback")
    assert out["model_version"] == "1" and out["existing"] is False  # the re-run succeeds; the failed one left no number behind
    assert client.get_run(out["mlflow_run_id"]).info.status == "FINISHED"


def _break(kind: str, src: Path, dst: Path, tmp: Path) -> tuple[Path, str]:
    """A broken copy of the demo checkpoint, and the message its refusal must carry."""
    import pickle

    from loraline.tiny_models import build_llama, build_lora

    if kind == "different-base":
        other = build_llama(tmp / "other-base", vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=1, intermediate_size=512)
        return build_lora(other, dst, r=8, target_modules=["q_proj"]), "trained for a different base"
    shutil.copytree(src, dst)
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if kind == "pickle-only":
        (dst / "adapter_model.safetensors").unlink()
        (dst / "adapter_model.bin").write_bytes(pickle.dumps({"weights": [0.0]}))
        return dst, "pickled weights are refused and were not loaded"
    if kind == "target-missing":
        cfg_path.write_text(json.dumps({**cfg, "target_modules": ["q_proj", "query_key_value"]}))
        return dst, "'query_key_value' do not exist in the base"
    if kind == "truncated-config":
        cfg_path.write_text(cfg_path.read_text()[:40])
        return dst, "adapter_config.json: not valid JSON"
    if kind == "nan":
        return _nan_adapter(src, dst.with_name("nan")), "NaN/Inf"
    if kind == "rank-above-limit":
        cfg_path.write_text(json.dumps({**cfg, "r": 1024}))
        return dst, "rank 1024 is above 512"
    if kind == "missing-files":
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (dst / f).unlink()
        return dst, "missing adapter_config.json"
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def registry_in_use(prefect_harness, demo_assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home where one good release ran (version 1, both aliases): the registry each bad input must leave as it is.
    Shared by the bad inputs below, which therefore also show that each one leaves nothing the next one would meet."""
    from loraline_flows.release import release

    home = tmp_path_factory.mktemp("in-use") / "home"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"LORALINE_HOME": str(home), "LORALINE_VLLM_PARITY": "false", "LORALINE_BENCH": "false",
                     "LORALINE_EVAL_EXAMPLES": "8"}.items():  # as the `home` fixture sets them
            mp.setenv(k, v)
        release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME)
    return home


@pytest.mark.parametrize("kind", ["pickle-only", "different-base", "target-missing", "truncated-config", "nan", "rank-above-limit", "missing-files"])
def test_each_bad_input_is_refused_by_the_flow_leaving_nothing(kind: str, registry_in_use: Path, demo_assets, home: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraline_flows.release import release

    monkeypatch.setenv("LORALINE_HOME", str(registry_in_use))
    settings = Settings()
    before = mlflow_state(settings)
    bad, message = _break(kind, demo_assets.checkpoint, tmp_path / "bad", tmp_path)
    state = release(adapter=str(bad), base=str(demo_assets.base), name=NAME, return_state=True)
    with pytest.raises(InvalidAdapter, match=message):
        state.result()
    assert mlflow_state(settings) == before == {"versions": [(NAME, "1")], "aliases": ["candidate", "champion"], "running": []}
    # A local adapter is fetched once: no retries (seconds apart) before the refusal.
    assert all(r.run_count <= 1 for r in task_runs(state) if r.name.startswith("fetch-adapter")), task_runs(state)
