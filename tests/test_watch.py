"""The watch flow on adapters logged to an MLflow experiment (real SQLite MLflow, Prefect's test harness); the
scheduled deployment over a directory is tested against a real Prefect server in tests/test_deployments.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from loraline.settings import Settings
from loraline.watch import WatchError, adapter_sources, scan

NAME = "smol-watch"


def log_finetune(client: MlflowClient, experiment: str, checkpoint: Path, folder: str = "adapter",
                 artifacts: Path | None = None) -> str:
    """What a training job does: a finished run in its experiment with the checkpoint as artifacts."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifacts.as_uri())
    run = client.create_run(exp_id, run_name="finetune")
    client.log_artifacts(run.info.run_id, str(checkpoint), folder)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_watch_releases_adapters_logged_to_an_experiment_once(prefect_harness, demo_assets, settings: Settings,
                                                              tmp_path: Path) -> None:
    from loraline_flows.watch import watch

    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    settings.ensure_dirs()
    run_id = log_finetune(client, "finetunes", demo_assets.checkpoint, "checkpoints/checkpoint-100", tmp_path / "trainer-artifacts")
    # A run still RUNNING (training not finished) is not picked up.
    exp_id = client.get_experiment_by_name("finetunes").experiment_id
    running = client.create_run(exp_id, run_name="still-training")
    client.log_artifacts(running.info.run_id, str(demo_assets.checkpoint), "adapter")

    assert adapter_sources(settings, experiment="finetunes") == [f"runs:/{run_id}/checkpoints/checkpoint-100"]
    rows = watch(base=str(demo_assets.base), name=NAME, experiment="finetunes")
    assert [(r["state"], r["model_version"]) for r in rows] == [("released now", "1")]
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["loraline.adapter.source"] == f"runs:/{run_id}/checkpoints/checkpoint-100"

    # The same checkpoint logged again by another run: same digest, nothing new.
    log_finetune(client, "finetunes", demo_assets.checkpoint)
    again = watch(base=str(demo_assets.base), name=NAME, experiment="finetunes")
    assert [r["state"] for r in again] == ["released", "duplicate"]
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1


def test_watch_says_what_is_wrong_with_what_it_watches(demo_assets, settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(WatchError, match="nothing to watch: give a directory"):
        adapter_sources(settings)
    with pytest.raises(WatchError, match="watched directory '/nope' does not exist"):
        adapter_sources(settings, directory="/nope")
    settings.ensure_dirs()
    with pytest.raises(WatchError, match="MLflow experiment 'no-such' does not exist"):
        adapter_sources(settings, experiment="no-such")
    # A broken adapter is reported as invalid (with the reason) and does not hide the good one.
    shutil.copytree(demo_assets.checkpoint, tmp_path / "w" / "good")
    bad = tmp_path / "w" / "bad"
    bad.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (bad / "adapter_config.json").symlink_to(outside)  # a link out of the adapter directory
    found = {Path(c.source).name: c for c in scan(adapter_sources(settings, directory=str(tmp_path / "w")), NAME, settings)}
    assert found["good"].state == "new" and found["bad"].state == "invalid"
    assert "adapter_config.json is a symlink to" in found["bad"].detail and "outside the adapter directory" in found["bad"].detail
