"""Faults injected into real release processes: the process is SIGKILLed at a chosen point (a real SIGKILL, sent by
the process to itself from a patched MLflow or digest call), then the release is run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import mlflow_state
from loraline.settings import Settings

NAME = "smol-fault"

# Runs `loraline release` in this interpreter after arranging for SIGKILL at one point.
KILLER = """
import os, signal, sys
point = sys.argv[1]
if point == "registration":  # the version exists, its run is RUNNING, lineage.json not written yet
    import mlflow
    real = mlflow.log_dict
    def log_dict(d, artifact_file, *a, **k):
        if artifact_file == "lineage.json":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(d, artifact_file, *a, **k)
    mlflow.log_dict = log_dict
elif point == "merge":  # the merged weights are written to the staging dir, not yet moved into place
    import loraline.merge as m
    m.digest_dir = lambda path: os.kill(os.getpid(), signal.SIGKILL)
sys.argv = ["loraline", "release", *sys.argv[2:]]
from flows.cli import main
main()
"""


def release(home: Path, demo_assets, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORALINE_HOME": str(home), "LORALINE_VLLM_PARITY": "false", "LORALINE_BENCH": "false",
           "LORALINE_IMAGE": "none", "LORALINE_EVAL_EXAMPLES": "2"}
    args = ["--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base), "--name", NAME, "--json"]
    cmd = [sys.executable, "-c", KILLER, kill_at, *args] if kill_at else [str(Path(sys.executable).with_name("loraline")), "release", *args]
    # Its own process group, output to files: a SIGKILLed CLI leaves Prefect's ephemeral API server (its child) running
    # and holding inherited pipes; like a supervisor, the test then kills what is left of the group.
    out, err = home.parent / "stdout", home.parent / "stderr"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, text=True, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=900)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, rc, out.read_text(), err.read_text())


@pytest.mark.parametrize("point", ["merge", "registration"])
def test_sigkill_then_rerun_completes_with_one_clean_version(point: str, demo_assets, tmp_path: Path) -> None:
    home = tmp_path / "home"
    killed = release(home, demo_assets, kill_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    s = Settings(home=home)
    after_kill = mlflow_state(s)
    if point == "registration":  # what the kill left: a version without lineage, its run RUNNING
        assert len(after_kill["versions"]) == 1 and len(after_kill["running"]) == 1
    else:
        assert after_kill["versions"] == [] and after_kill["running"] == []

    again = release(home, demo_assets)
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout)
    state = mlflow_state(s)
    # One version (the interrupted one is gone), no run left RUNNING, the aliases on the version that completed.
    assert state["versions"] == [(NAME, out["model_version"])] and state["running"] == []
    client = MlflowClient(s.resolved_tracking_uri, s.resolved_registry_uri)
    assert {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()} == {
        "candidate": out["model_version"], "champion": out["model_version"]}
    runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
    statuses = sorted((r.info.status, r.data.tags.get("loraline.status")) for r in runs)
    if point == "registration":
        assert statuses == [("FAILED", "interrupted"), ("FINISHED", "registered")], statuses
    else:
        assert statuses == [("FINISHED", "registered")], statuses
    # And a third run changes nothing.
    third = json.loads(release(home, demo_assets).stdout)
    assert third["model_version"] == out["model_version"] and third["existing"] is True
    assert mlflow_state(s) == state
