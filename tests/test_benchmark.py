"""The benchmark step on CPU with the demo model: every path, numbers that hold together, MLflow and Prefect records.

The numbers themselves are CPU numbers for a 2-layer model (the GPU ones are in benchmarks/); what is tested
here is that every path runs, measures what was asked, and lands where users look.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import SMALL_BENCH
from loraline.benchmark import recommend
from loraline.settings import Settings
from loraline.workload import PathResult, Percentiles

NAME = "smol-sql"
LORALINE = str(Path(sys.executable).with_name("loraline"))
P = Percentiles(1.0, 2.0, 3.0, 1.5)


def result(path: str, engine: str, mode: str, tok_s: float, concurrency: int | None = None) -> PathResult:
    return PathResult(path, engine, mode, 4, 32, tok_s, (tok_s,), tok_s / 8, P, P, P, P, None, concurrency=concurrency)


def test_recommendation_follows_the_lora_to_merged_ratio() -> None:
    merged = [result("vllm-offline-merged", "vllm", "merged", 1000), result("vllm-server-merged", "vllm-server", "merged", 500, 8)]
    near = recommend([*merged, result("vllm-offline-lora", "vllm", "lora", 960), result("vllm-server-lora", "vllm-server", "lora", 470, 8)])
    assert near.mode == "lora" and near.lora_vs_merged == {"vllm-offline-lora": 0.96, "vllm-server-lora@c8": 0.94}
    far = recommend([*merged, result("vllm-offline-lora", "vllm", "lora", 960), result("vllm-server-lora", "vllm-server", "lora", 250, 8)])
    assert far.mode == "merged" and "50%" in far.reason and "vllm-server-lora@c8" in far.reason
    # HF peft is never the LoRA evidence: it is not how LoRA is served.
    alone = recommend([*merged, result("hf-peft", "transformers", "lora", 5000)])
    assert alone.mode == "merged" and alone.lora_vs_merged == {}


def _ordered(p: Percentiles | None) -> bool:
    return p is not None and 0 < p.p50 <= p.p90 <= p.p99


@pytest.mark.slow
def test_release_benchmarks_every_path_and_records_it(prefect_api_url: str, demo_assets, vllm_python: Path, settings: Settings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark that fails after registration marks the version failed; `loraline bench` then benchmarks that
    version (the command on its own, from a shell); a re-run of the release completes it without benchmarking again."""
    from prefect.client.orchestration import get_client

    from loraline_flows.release import release

    for k, v in SMALL_BENCH.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LORALINE_BENCH", "true")
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)

    # 1. No engine: HF paths run, then the vLLM paths cannot start. The release is registered but marked failed.
    monkeypatch.setenv("LORALINE_VLLM_PYTHON", str(settings.home / "no-such-python"))
    with pytest.raises(Exception, match="no-such-python is not an executable file"):
        release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME)
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["loraline.status"] == "failed" and mv.tags["loraline.failed.step"] == "benchmark"
    assert "no-such-python" in mv.tags["loraline.failed.reason"] and "make setup" in mv.tags["loraline.failed.reason"]
    assert "loraline.bench.recommendation" not in mv.tags

    # 2. The engine is back: `loraline bench models:/NAME/1` (a separate process; its flow run goes to the same Prefect
    # server) benchmarks version 1 and records everything.
    monkeypatch.setenv("LORALINE_VLLM_PYTHON", str(vllm_python))
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    proc = subprocess.run([LORALINE, "bench", f"models:/{NAME}/1", "--json"], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["model_version"] == "1"
    assert [v.version for v in client.search_model_versions(f"name = '{NAME}'")] in (["1"], [1])
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["loraline.status"] == "benchmarked"
    b = res["benchmark"]
    assert mv.tags["loraline.bench.recommendation"] == b["recommendation"] in ("merged", "lora") and b["reason"]
    assert set(b["output_tok_s"]) == {"hf-merged", "hf-peft", "vllm-offline-merged", "vllm-offline-lora", "vllm-server-merged@c1",
                                      "vllm-server-merged@c4", "vllm-server-lora@c1", "vllm-server-lora@c4"}
    assert all(v > 0 for v in b["output_tok_s"].values())

    # 3. A re-run of the release: version 1 again (no new version), its benchmark kept, not run again; gated.
    out = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME)
    assert out["model_version"] == "1" and out["existing"] is True and out["mlflow_run_id"] == res["mlflow_run_id"]
    assert out["benchmark"] == b and out["gate"]["passed"] is True
    assert [v.version for v in client.search_model_versions(f"name = '{NAME}'")] in (["1"], [1])

    run_id = out["mlflow_run_id"]
    report = json.loads(Path(client.download_artifacts(run_id, "benchmark/benchmark.json")).read_text())
    w = report["workload"]
    assert (w["input_len"], w["output_len"], w["prompts"], w["repeats"], w["concurrency"]) == (16, 8, 4, 2, [1, 4])
    rows = {(r["path"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {("hf-merged", None), ("hf-peft", None), ("vllm-offline-merged", None), ("vllm-offline-lora", None),
                         ("vllm-server-merged", 1), ("vllm-server-merged", 4), ("vllm-server-lora", 1), ("vllm-server-lora", 4)}
    for (path, c), r in rows.items():
        # Every request produced exactly output_len tokens, and the rates agree with each other.
        assert r["output_tokens"] == r["requests"] * 8, path
        assert len(r["output_tok_s_repeats"]) == 2 and min(r["output_tok_s_repeats"]) <= r["output_tok_s"] <= max(r["output_tok_s_repeats"])
        assert r["requests_s"] * 8 == pytest.approx(r["output_tok_s"], rel=0.02), path
        for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert _ordered(Percentiles(**{f: r[k][f] for f in ("p50", "p90", "p99", "mean")})), (path, k)
        # A request's end-to-end time covers its first token and the decode after it.
        assert r["e2e_ms"]["p50"] >= r["ttft_ms"]["p50"], path
    for c in (1, 4):
        s = rows[("vllm-server-merged", c)]
        assert s["requests"] == max(4, 2 * c) and s["itl_ms"]["p50"] > 0 and s["engine_start_s"] > 0 and s["peak_memory_bytes"] > 0
    assert rows[("vllm-offline-merged", None)]["engine_start_s"] > 0
    # vLLM's own harness ran on the same server and workload, and finished every request.
    for c in (1, 4):
        x, n = report["crosscheck"]["levels"][str(c)], max(4, 2 * c)
        assert x["vllm"]["completed"] == n and x["vllm"]["failed"] == 0 and x["vllm"]["total_output_tokens"] == n * 8
        assert x["output_tok_s_ratio"] == pytest.approx(x["loraline"]["output_tok_s"] / x["vllm"]["output_tok_s"])

    metrics = client.get_run(run_id).data.metrics
    assert metrics["bench.vllm-server-merged.c4.output_tok_s"] == pytest.approx(rows[("vllm-server-merged", 4)]["output_tok_s"])
    assert metrics["bench.hf-peft.ttft_ms.p99"] >= metrics["bench.hf-peft.ttft_ms.p50"] > 0
    pngs = {a.path for a in client.list_artifacts(run_id, "benchmark")}
    assert {"benchmark/throughput.png", "benchmark/latency.png", "benchmark/concurrency.png", "benchmark/benchmark.md"} <= pngs
    for name in ("throughput", "latency", "concurrency"):
        png = Path(client.download_artifacts(run_id, f"benchmark/{name}.png")).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    lineage = json.loads(Path(client.download_artifacts(run_id, "lineage.json")).read_text())
    assert lineage["benchmark"]["recommendation"] == b["recommendation"]

    # The Prefect UI shows the table as a markdown artifact of the run.
    with get_client(sync_client=True) as pc:
        arts = pc.read_latest_artifacts()
    md = next(a for a in arts if a.key == "benchmark-smol-sql")
    for path in ("hf-merged", "hf-peft", "vllm-offline-lora", "vllm-server-merged", "vllm-server-lora", "vllm bench serve",
                 "Recommended deploy mode"):
        assert path in md.data, path


def test_release_dirs_refuse_what_a_benchmark_cannot_use(demo_assets, settings: Settings, tmp_path: Path) -> None:
    from loraline.benchmark import release_dirs
    from loraline.errors import EngineError
    from loraline.sources import fetch_base

    (tmp_path / "adapter").mkdir()
    (tmp_path / "merged").mkdir()
    base_sha = fetch_base(str(demo_assets.base), settings).sha256
    lineage = {"model_name": NAME, "model_version": "3", "adapter": {"path": str(tmp_path / "adapter")},
               "merged": {"path": str(tmp_path / "gone")},
               "base": {"source": str(demo_assets.base), "resolved": str(demo_assets.base), "sha256": base_sha}}
    with pytest.raises(EngineError, match=r"merged model of models:/smol-sql/3 is gone from .*gone; re-run `loraline release`"):
        release_dirs(lineage, settings)
    lineage["merged"]["path"] = str(tmp_path / "merged")
    adapter, base, merged = release_dirs(lineage, settings)
    assert (adapter, merged) == (tmp_path / "adapter", tmp_path / "merged") and fetch_base(str(base), settings).sha256 == base_sha
    lineage["base"]["sha256"] = "0" * 64  # the base on disk is not the one released
    with pytest.raises(EngineError, match=r"changed since the release .*released 000000000000"):
        release_dirs(lineage, settings)
