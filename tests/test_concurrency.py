"""Eight releases at once against one MLflow server and one Prefect server (real, on 127.0.0.1): seven different
adapters and one of them twice. Each is a separate `loraline release` process, as eight users (or eight watch
subflows on eight workers) would start them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import adapter_version

NAME = "smol-many"
LORALINE = str(Path(sys.executable).with_name("loraline"))


def test_eight_releases_at_once_give_one_version_per_digest(session_servers, demo_assets, tmp_path: Path) -> None:
    mlflow_url = session_servers.mlflow_url
    adapters = [demo_assets.checkpoint]
    for i in range(6):  # six more versions of the adapter, each a new digest
        adapters.append(adapter_version(adapters[-1], tmp_path / f"v{i + 2}"))
    jobs = adapters + [demo_assets.checkpoint]  # the first one twice
    env = {**os.environ, "LORALINE_HOME": str(tmp_path / "home"), "LORALINE_TRACKING_URI": mlflow_url,
           "PREFECT_API_URL": f"{session_servers.prefect_url}/api", "LORALINE_VLLM_PARITY": "false",
           "LORALINE_BENCH": "false", "LORALINE_IMAGE": "none", "LORALINE_EVAL_EXAMPLES": "2", "LORALINE_PARITY_PROMPTS": "2"}
    procs = [subprocess.Popen([LORALINE, "release", "--adapter", str(a), "--base", str(demo_assets.base), "--name", NAME,
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for a in jobs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1500)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out))

    client = MlflowClient(mlflow_url, mlflow_url)
    versions = client.search_model_versions(f"name = '{NAME}'")
    by_sha = {}
    for v in versions:
        by_sha.setdefault(v.tags["loraline.adapter.sha256"], []).append(v.version)
    # One version per distinct digest (seven); the duplicate got the same one. (A version created by the loser of a
    # registration race is deleted again, so its number may be missing: numbers are unique, not gapless.)
    assert len(by_sha) == 7 and all(len(vs) == 1 for vs in by_sha.values()), by_sha
    assert len(versions) == 7
    assert results[0]["model_version"] == results[-1]["model_version"]
    # ... and its steps ran once: the duplicate waited for them (two evaluations of one version at once made MLflow's
    # SQLite store refuse a tag in the CI run of e5a4906), and no version is left held by a process.
    assert len(client.get_metric_history(results[0]["mlflow_run_id"], "eval.accuracy")) == 1
    assert not [v.version for v in versions if "loraline.owner" in v.tags]
    assert len({r["model_version"] for r in results}) == 7
    for r in results:  # each answer is consistent with what MLflow holds for that version
        mv = client.get_model_version(NAME, r["model_version"])
        assert mv.tags["loraline.adapter.sha256"] == r["adapter"]["sha256"] and mv.run_id == r["mlflow_run_id"]
        lineage = json.loads(Path(client.download_artifacts(mv.run_id, "lineage.json")).read_text())
        assert lineage["model_version"] == r["model_version"] and lineage["adapter"]["sha256"] == r["adapter"]["sha256"]
    # No run left RUNNING; a run that lost a registration race says so (KILLED, loraline.status=duplicate).
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id])
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    for r in runs:
        if r.info.run_id not in {v.run_id for v in versions}:
            assert r.info.status in ("KILLED", "FAILED") and r.data.tags.get("loraline.status") == "duplicate", r.info
    # The aliases name versions whose gate passed.
    aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    assert set(aliases) == {"candidate", "champion"}
    for v in aliases.values():
        assert client.get_model_version(NAME, v).tags["loraline.gate"] == "passed"


@pytest.mark.slow
def test_four_releases_at_once_on_a_fresh_home_all_succeed(demo_assets, tmp_path: Path) -> None:
    """Issue 13: four `loraline release` started at once on a fresh home, no services (embedded SQLite MLflow store,
    Prefect's ephemeral API on its own SQLite database): one failed in MLflow's schema migration ("Online migration
    expected to match one row"). The first initialization of each embedded store now runs once, under a file lock."""
    home = tmp_path / "fresh-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORALINE_", "PREFECT_", "MLFLOW_TRACKING_"))}
    env.update({"LORALINE_HOME": str(home), "LORALINE_VLLM_PARITY": "false", "LORALINE_BENCH": "false",
                "LORALINE_IMAGE": "none", "LORALINE_EVAL_EXAMPLES": "2", "LORALINE_PARITY_PROMPTS": "2",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    names = [f"fresh-{i}" for i in range(4)]
    procs = [subprocess.Popen([LORALINE, "release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base),
                               "--name", name, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name in names]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1500)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    assert [(r["model_name"], r["model_version"]) for r in results] == [(n, "1") for n in names]

    db = f"sqlite:///{home.resolve() / 'mlflow.db'}"
    client = MlflowClient(db, db)
    assert sorted((v.name, str(v.version)) for v in client.search_model_versions("")) == [(n, "1") for n in names]
    for r in results:
        assert client.get_run(r["mlflow_run_id"]).info.status == "FINISHED"
    assert (home / "prefect" / "prefect.db").is_file()  # the flows ran on the ephemeral API's database in the home
