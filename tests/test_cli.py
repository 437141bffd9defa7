"""The CLI end to end, as a user runs it: a real `loraline` process, SQLite MLflow, its flow runs sent to the session's
Prefect server (PREFECT_API_URL exported; Prefect's ephemeral mode, as a plain shell runs it: tests/test_concurrency.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import coreutils_digest, loraline, mlflow_state
from loraline.settings import Settings


@pytest.fixture(scope="module")
def cli_release(demo_assets, prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("cli") / "home"
    proc = loraline("release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base), "--name", "smol-sql",
                    "--json", home=home, prefect_api_url=prefect_api_url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home, json.loads(proc.stdout), prefect_api_url


def test_release_prints_the_lineage_contract(cli_release, demo_assets) -> None:
    home, out, api = cli_release
    assert out["model_name"] == "smol-sql" and out["model_version"] == "1"
    assert out["model_uri"] == "models:/smol-sql/1"
    assert out["tracking_uri"] == f"sqlite:///{home.resolve() / 'mlflow.db'}"
    assert len(out["mlflow_run_id"]) == 32
    assert out["adapter"]["source"] == str(demo_assets.checkpoint)
    assert out["adapter"]["sha256"] == coreutils_digest(Path(out["adapter"]["path"]))
    assert out["base"]["sha256"] == coreutils_digest(demo_assets.base)
    assert out["merged"]["sha256"] == coreutils_digest(Path(out["merged"]["path"]))
    assert out["merged"]["dtype"] == "bfloat16" and out["merged"]["bytes"] > 0
    p = out["parity"]
    assert p["prompts"] == 8 and p["identical"] + p["close"] == 8 and p["max_abs_logprob_diff"] >= 0


def test_trace_from_every_end(cli_release, demo_assets) -> None:
    home, out, api = cli_release
    for ref in (str(demo_assets.checkpoint), out["adapter"]["sha256"], out["merged"]["sha256"], "models:/smol-sql/1", "models:/smol-sql@champion"):
        proc = loraline("trace", ref, "--json", home=home, prefect_api_url=api)
        assert proc.returncode == 0, (ref, proc.stderr[-2000:])
        chain = json.loads(proc.stdout)
        assert chain["model_version"] == "1" and chain["mlflow_run_id"] == out["mlflow_run_id"], ref
        assert chain["adapter"]["sha256"] == out["adapter"]["sha256"]
        assert chain["base"]["sha256"] == out["base"]["sha256"]
        assert chain["merged"]["sha256"] == out["merged"]["sha256"]
        assert sorted(chain["aliases"]) == ["candidate", "champion"]  # moved by the release's gate
    proc = loraline("trace", "models:/smol-sql@nope", "--json", home=home, prefect_api_url=api)
    assert proc.returncode == 1 and "cannot trace 'models:/smol-sql@nope'" in proc.stderr


def test_refused_release_exits_nonzero_with_one_line(demo_assets, prefect_api_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(demo_assets.checkpoint, bad)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    home = tmp_path / "home"
    proc = loraline("release", "--adapter", str(bad), "--base", str(demo_assets.base), "--name", "smol-sql", "--json", home=home,
                    prefect_api_url=prefect_api_url)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ") and "adapter_config.json: not valid JSON" in lines[0]
    assert mlflow_state(Settings(home=home)) == {"versions": [], "aliases": [], "running": []}


def test_bench_command_refuses_a_reference_to_nothing(cli_release) -> None:
    """`loraline bench` of a version that does not exist: one line, exit 1 (the command benchmarking a released
    version, and what it records: tests/test_benchmark.py)."""
    home, _, api = cli_release
    proc = loraline("bench", "models:/smol-sql/9", home=home, prefect_api_url=api)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: cannot trace 'models:/smol-sql/9'"), proc.stderr


def test_rerun_of_an_unchanged_release_answers_its_lineage_from_mlflow_marked_cached(cli_release, demo_assets) -> None:
    """A re-run with nothing left to do prints the release's JSON, marked "cached" (and says so on stderr), without a
    flow run and without writing anything; --no-cache runs the flow, whose answer is the same but for the mark."""
    home, first, api = cli_release
    release = ("release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base), "--name", "smol-sql")
    before = mlflow_state(Settings(home=home))
    runs = _runs(home)
    proc = loraline(*release, "--json", home=home, prefect_api_url=api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cached = json.loads(proc.stdout)
    assert cached["cached"] is True and cached["existing"] is True and cached["status"] == "registered"
    # The first release's lineage, every key of it (digests, parity, evaluation, gate, plan ...), unchanged.
    assert {k: v for k, v in cached.items() if k not in ("existing", "status", "failed_step", "cached")} == \
           {k: v for k, v in first.items() if k != "existing"}
    assert "models:/smol-sql/1 already holds this adapter and base" in proc.stderr and "no flow run" in proc.stderr
    assert mlflow_state(Settings(home=home)) == before and _runs(home) == runs  # read only: no run, version or alias
    human = loraline(*release, home=home, prefect_api_url=api)
    assert human.returncode == 0 and "cached" in human.stdout and "models:/smol-sql/1" in human.stdout

    flow = loraline(*release, "--json", "--no-cache", home=home, prefect_api_url=api)
    assert flow.returncode == 0, flow.stderr[-3000:]
    assert json.loads(flow.stdout) == {k: v for k, v in cached.items() if k != "cached"}
    assert "already holds" not in flow.stderr


def test_rerun_is_not_answered_from_the_cache_when_the_settings_ask_for_more(cli_release, demo_assets,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a release that is done *for these settings* is answered from MLflow: a re-run asking for a step the release
    lacks, or under settings its validation would refuse, is the flow's (here: refused, as a first release would be).
    An MLflow server that does not answer is the flow's error at once (not after a second wait in the flow)."""
    import socket

    from loraline.errors import TrackingError
    from loraline.resume import cached_release

    home, first, api = cli_release
    adapter, base = str(demo_assets.checkpoint), str(demo_assets.base)
    s = Settings(home=home, bench=False)
    assert cached_release(adapter, base, "smol-sql", s)["mlflow_run_id"] == first["mlflow_run_id"]
    assert cached_release(adapter, base, "smol-sql", s.model_copy(update={"bench": True})) is None  # no benchmark yet
    assert cached_release(adapter, base, "other-name", s) is None  # never released under that name
    assert cached_release(adapter, base, "smol-sql", s.model_copy(update={"max_lora_rank": 1})) is None
    proc = loraline("release", "--adapter", adapter, "--base", base, "--name", "smol-sql", "--json", home=home,
                    prefect_api_url=api, LORALINE_MAX_LORA_RANK="1")
    assert proc.returncode == 1 and "rank 8 is above max_lora_rank=1" in proc.stderr, proc.stderr[-2000:]
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(TrackingError, match=rf"the MLflow server at http://127.0.0.1:{port} does not answer"):
        cached_release(adapter, base, "smol-sql", s.model_copy(update={"tracking_uri": f"http://127.0.0.1:{port}"}))


def _runs(home: Path) -> list[str]:
    from mlflow import MlflowClient

    s = Settings(home=home)
    client = MlflowClient(s.resolved_tracking_uri, s.resolved_registry_uri)
    return sorted(r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()]))
