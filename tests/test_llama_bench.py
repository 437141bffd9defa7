"""llama.cpp beside vLLM-CPU: llama-cpp-python's server under loraline's load generator, and the CPU deployment pick.

The numbers themselves are a busy 2-core machine's; what is tested is what a user reads off the table: every request
gave exactly the tokens asked for (llama.cpp has no ignore_eos), memory and start-to-ready are there, and the
recommendation names an engine and weights that were measured, by the documented rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraline.benchmark import BenchReport, bench_cpu_servers, recommend, recommend_cpu
from loraline.llama_bench import GgufTarget
from loraline.settings import Settings
from loraline.workload import PathResult, Percentiles, Workload

P = Percentiles(1.0, 2.0, 3.0, 1.5)
MIB = 2**20


def row(path: str, tok_s: float, c: int, rss_mib: int) -> PathResult:
    engine = "vllm-server" if path.startswith("vllm") else "llama.cpp-server"
    quant = "bf16" if engine == "vllm-server" else path.rsplit("-", 1)[1]
    return PathResult(path, engine, "merged", 16, 256, tok_s, (tok_s,), tok_s / 16, P, P, P, P, None, engine_start_s=2.0,
                      concurrency=c, peak_rss_bytes=rss_mib * MIB, quant=quant)


def test_cpu_recommendation_rule() -> None:
    """Fastest at concurrency 8 among files whose parity did not fail; within 5% the smaller peak RSS wins."""
    rows = [row("vllm-server-merged", 300, 8, 2000), row("vllm-server-merged", 90, 1, 2000),
            row("llama.cpp-server-f16", 150, 8, 400), row("llama.cpp-server-q8_0", 200, 8, 250),
            row("llama.cpp-server-q4_k_m", 400, 8, 200), row("llama.cpp-server-q8_0", 199, 1, 250)]
    verdicts = {"f16": "identical", "q8_0": "close", "q4_k_m": "failed"}
    r = recommend_cpu(rows, verdicts)
    assert r is not None and (r.engine, r.quant, r.concurrency) == ("vLLM-CPU", "bf16", 8)
    assert "llama.cpp-server-q4_k_m" in r.reason and not r.candidates["llama.cpp-server-q4_k_m"]["eligible"]
    # vLLM within 5% of q8_0 (and q8_0 the fastest): the smaller memory wins.
    rows[0] = row("vllm-server-merged", 195, 8, 2000)
    r = recommend_cpu(rows, verdicts)
    assert (r.engine, r.quant) == ("llama.cpp", "q8_0") and "use more memory" in r.reason
    rows[0] = row("vllm-server-merged", 205, 8, 2000)
    r = recommend_cpu(rows, verdicts)
    assert (r.engine, r.quant) == ("llama.cpp", "q8_0") and "with less memory" in r.reason
    # No level 8 shared by every candidate: the largest shared one below it.
    some = [x for x in rows if x.path != "llama.cpp-server-f16" and (x.path, x.concurrency) != ("llama.cpp-server-q8_0", 8)]
    assert recommend_cpu(some, verdicts).concurrency == 1
    # Without llama.cpp there is nothing to compare.
    assert recommend_cpu([row("vllm-server-merged", 300, 8, 2000)], verdicts) is None

    # The release report says it, as the benchmark step recorded it in the lineage.
    from loraline.report import release_report

    part = {"source": "/x", "sha256": "0" * 64, "path": "/x"}
    bench = {"device": "cpu", "vllm_version": "0.32.0", "recommendation": "merged", "reason": "r", "artifacts": "runs:/r/benchmark",
             "output_tok_s": {"llama.cpp-server-q8_0@c8": 200.0},
             "cpu_recommendation": {"engine": r.engine, "quant": r.quant, "path": r.path, "concurrency": 8, "reason": r.reason}}
    md = release_report({"model_name": "m", "model_version": "1", "mlflow_run_id": "r", "tracking_uri": "sqlite:///x.db",
                         "adapter": part, "base": part, "merged": part, "benchmark": bench})
    assert "CPU deployment recommendation: **llama.cpp, q8_0** (200.0 out tok/s at concurrency 8" in md


@pytest.mark.slow
def test_llama_cpp_server_path_counts_tokens_and_reports_memory(real_release_run, llama_python: Path, settings: Settings,
                                                                tmp_path: Path) -> None:
    """llama-cpp-python's server on the real demo's release (the q8_0 export of the merged SmolLM2 fine-tune that the
    session's `loraline release --gguf q8_0` made), c=1 and 2: exactly output_len tokens per request (its own usage
    agrees), the prompt read as exactly input_len tokens, peak RSS and ready time present, the pick names what was
    measured; the table and the plot are made."""
    from loraline.gguf_export import exported_file
    from loraline.plots import write_plots

    assert real_release_run.proc.returncode == 0, real_release_run.proc.stderr[-3000:]
    out = json.loads(real_release_run.proc.stdout)
    q8 = next(g for g in out["gguf"] if g["quant"] == "q8_0")
    gguf, there = exported_file(q8, Settings(home=real_release_run.svc.home).gguf_dir, out["merged"]["sha256"])
    assert there, gguf
    w = Workload(input_len=16, output_len=8, repeats=1, concurrency=(1, 2), server_min_requests=3)
    target = GgufTarget("q8_0", gguf, q8["parity"]["verdict"], q8["bytes"])
    results, engines, cpu = bench_cpu_servers(Path(out["merged"]["path"]), [target], settings, w, vllm=False,
                                              served_name="smol")

    assert [(r.path, r.concurrency) for r in results] == [("llama.cpp-server-q8_0", 1), ("llama.cpp-server-q8_0", 2)]
    for r in results:
        assert r.requests == max(3, 2 * r.concurrency) and r.output_tokens == r.requests * 8
        assert r.requests_s * 8 == pytest.approx(r.output_tok_s, rel=0.02)
        assert 0 < r.ttft_ms.p50 <= r.e2e_ms.p50 and r.itl_ms.p50 > 0 and r.tpot_ms.p50 > 0
        # the server maps the file: at least most of its weights are resident, and a Python process besides
        assert r.peak_rss_bytes > 0.5 * gguf.stat().st_size and r.engine_start_s > 0 and r.quant == "q8_0"
    e = engines["llama.cpp-server-q8_0"]
    assert e["usage_check"] == {"prompt_tokens": 16, "completion_tokens": 8, "finish_reason": "length"}
    assert e["memory"]["samples"] > 0 and e["memory"]["hwm_sum_bytes"] >= e["memory"]["peak_rss_bytes"] > 0
    assert e["threads"] >= 1 and e["llama_cpp_python"]

    assert cpu is not None and (cpu.engine, cpu.quant, cpu.path, cpu.concurrency) == ("llama.cpp", "q8_0", "llama.cpp-server-q8_0", 2)
    report = BenchReport(workload=w, device="cpu", device_name="cpu", vllm_version="-", results=tuple(results),
                         engines=engines, crosscheck={}, recommendation=recommend(results), cpu=cpu)
    md = report.markdown()
    assert "| llama.cpp | q8_0 | 2 |" in md and "**CPU deployment: llama.cpp, q8_0.**" in md
    assert report.metrics()["bench.llama.cpp-server-q8_0.c2.peak_rss_bytes"] == results[1].peak_rss_bytes
    pngs = {p.name for p in write_plots(report, tmp_path)}
    assert "cpu_engines.png" in pngs and (tmp_path / "cpu_engines.png").read_bytes()[:4] == b"\x89PNG"


def test_release_gguf_files_found_by_merged_digest_or_noted(tmp_path: Path) -> None:
    """The benchmark step serves the release's GGUF files from <gguf_dir>/<merged sha256>/; one that is gone (or not
    the size recorded) is a note in the report, not a crash."""
    from loraline.llama_bench import gguf_targets

    d = tmp_path / "gguf" / "abc"
    d.mkdir(parents=True)
    (d / "model-f16.gguf").write_bytes(b"GGUF" + bytes(60))
    (d / "model-q4_k_m.gguf").write_bytes(b"GGUF")
    entries = [{"quant": "f16", "file": "model-f16.gguf", "bytes": 64, "parity": {"verdict": "identical"}, "uri": "runs:/r/gguf/model-f16.gguf"},
               {"quant": "q8_0", "file": "model-q8_0.gguf", "bytes": 10, "parity": {"verdict": "close"}, "uri": "runs:/r/gguf/model-q8_0.gguf"},
               {"quant": "q4_k_m", "file": "model-q4_k_m.gguf", "bytes": 99, "parity": {"verdict": "failed"}, "uri": "u"}]
    found, notes = gguf_targets(entries, tmp_path / "gguf", "abc")
    assert found == [GgufTarget("f16", d / "model-f16.gguf", "identical", 64)]
    assert len(notes) == 2 and "llama.cpp q8_0: the GGUF file is not at" in notes[0] and "runs:/r/gguf/model-q8_0.gguf" in notes[0]
