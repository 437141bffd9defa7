"""The release gate: only it moves `candidate`/`champion`, and only for a release that meets the thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import adapter_version
from loraline.gate import ChampionScore, decide
from loraline.params import GateThresholds
from loraline.report import release_report
from loraline.settings import Settings


def aliases(client: MlflowClient) -> dict[str, str]:
    """The registered model's aliases, versions as strings (the SQLite store returns ints)."""
    return {k: str(v) for k, v in (client.get_registered_model(NAME).aliases or {}).items()}


NAME = "smol-gate"


def _lineage(**over) -> dict:
    base = {"model_name": NAME, "model_version": "3", "parity": {"prompts": 8, "identical": 6, "close": 2, "failed": 0},
            "vllm_parity": {}, "benchmark": None, "images": []}
    return {**base, **over}


def test_decide_names_every_missed_threshold() -> None:
    ok = decide(_lineage(), "registered", GateThresholds())
    assert ok.passed and [c.name for c in ok.checks] == ["status", "parity", "champion"]
    assert ok.checks[-1].detail == "champion: none yet; this release is compared with no one"

    d = decide(_lineage(), "registered", GateThresholds(min_parity_identical=0.9, require_vllm_parity=True,
                                                         min_output_tok_s=100, require_image=True))
    assert not d.passed
    assert {c.name for c in d.checks if not c.passed} == {"parity", "vllm_parity", "benchmark", "image"}
    assert "6 of 8 identical (75%)" in d.reasons[0] and "needs >= 90% identical" in d.reasons[0]
    assert any("not run (LORALINE_VLLM_PARITY=false)" in r for r in d.reasons)

    bench = {"output_tok_s": {"vllm-server-merged@c1": 90.0, "vllm-server-merged@c8": 450.0, "hf-merged": 4000.0}}
    fast = decide(_lineage(benchmark=bench), "benchmarked", GateThresholds(min_output_tok_s=400))
    assert fast.passed and any(c.name == "throughput" and "450.0 tok/s" in c.detail for c in fast.checks)
    slow = decide(_lineage(benchmark=bench), "benchmarked", GateThresholds(min_output_tok_s=500))
    assert not slow.passed and "needs >= 500" in slow.reasons[0]

    ev = {"accuracy": 0.25, "base_accuracy": 0.3, "gain": -0.05, "examples": 24, "valid_sql": 20}
    worse = decide(_lineage(evaluation=ev), "benchmarked", GateThresholds(min_accuracy=0.2, min_accuracy_gain=0.0))
    assert not worse.passed and [c.name for c in worse.checks if not c.passed] == ["accuracy_gain"]
    assert "accuracy gain over the base -5.0%; needs >= +0.0%" in worse.reasons[0]
    low = decide(_lineage(evaluation=ev), "benchmarked", GateThresholds(min_accuracy=0.5))
    assert "task accuracy 25.0% (24 questions, base 30.0%); needs >= 50.0%" in low.reasons[0]
    assert "not run (LORALINE_EVAL=false)" in decide(_lineage(), "registered", GateThresholds(min_accuracy=0.5)).reasons[0]

    failed = decide(_lineage(), "failed", GateThresholds())
    assert not failed.passed and "a step after registration failed" in failed.reasons[0]


def test_decide_refuses_a_challenger_worse_than_the_champion() -> None:
    ev = {"accuracy": 0.625, "base_accuracy": 0.125, "gain": 0.5, "examples": 8, "valid_sql": 7}
    challenger = _lineage(model_version="2", evaluation=ev)
    champion = ChampionScore(version="1", accuracy=0.875)

    refused = decide(challenger, "released", GateThresholds(), champion)
    assert not refused.passed and [c.name for c in refused.checks if not c.passed] == ["champion"]
    assert refused.reasons == ["task accuracy 62.5% (v2) is below champion v1's 87.5% (tolerance 0.0%)"]
    assert refused.to_dict()["champion"] == {"version": "1", "accuracy": 0.875}

    # Within the tolerance (25 points), equal, or better: passes and says so.
    lenient = decide(challenger, "released", GateThresholds(champion_tolerance=0.25), champion)
    assert lenient.passed and lenient.checks[-1].detail == "task accuracy 62.5% (v2) is not below champion v1's 87.5% (tolerance 25.0%)"
    assert decide(challenger, "released", GateThresholds(), ChampionScore("1", 0.625)).passed
    # One tolerance point short of the gap still fails: the comparison is not a rounding accident.
    assert not decide(challenger, "released", GateThresholds(champion_tolerance=0.24), champion).passed

    # No champion yet, the champion is this version, a champion never evaluated: nothing to compare, passes.
    assert decide(challenger, "released", GateThresholds(), None).passed
    same = decide(challenger, "released", GateThresholds(), ChampionScore("2", 0.875))
    assert same.passed and same.checks[-1].detail == "champion: this version (v2) is the champion already"
    unknown = decide(challenger, "released", GateThresholds(), ChampionScore("1", None))
    assert unknown.passed and "champion v1 has no task evaluation" in unknown.checks[-1].detail
    # A challenger that was not evaluated cannot show it is not worse.
    blind = decide(_lineage(model_version="2"), "released", GateThresholds(), champion)
    assert not blind.passed and "champion v1 scored 87.5%" in blind.reasons[0]
    # Disabled: no champion check at all.
    off = decide(challenger, "released", GateThresholds(champion_tolerance=None), champion)
    assert off.passed and "champion" not in [c.name for c in off.checks]

    # The release report shows the comparison, and what the served image scored through the openai client.
    served = {"mode": "merged", "model": NAME, "examples": 8, "correct": 4, "valid": 7, "accuracy": 0.5}
    md = release_report(_report_lineage({**challenger, "evaluation": {**ev, "served_accuracy": 0.5, "served": served}}),
                        refused.to_dict())
    assert f"| served image (merged, `{NAME}` through the openai client) | 50.0% (7 ran) | 8 |" in md
    assert "| champion v1 | 87.5% | |" in md
    assert "Champion–challenger: task accuracy 62.5% (v2) is below champion v1's 87.5% (tolerance 0.0%) — **refused**." in md
    assert "| champion | NO | task accuracy 62.5% (v2) is below champion v1's 87.5%" in md


def _report_lineage(lineage: dict) -> dict:
    """A lineage with what the report's lineage table reads."""
    part = {"source": "/x", "sha256": "0" * 64, "path": "/x"}
    return {**lineage, "mlflow_run_id": "r", "tracking_uri": "sqlite:///x.db", "adapter": part, "base": part, "merged": part}


def test_thresholds_refuse_nonsense_with_the_field_named() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_parity_identical"):
        GateThresholds(min_parity_identical=1.5)
    with pytest.raises(ValidationError, match="unknown_field|extra"):
        GateThresholds.model_validate({"unknown_field": 1})


def test_gate_moves_aliases_only_for_passing_releases(prefect_harness, demo_assets, settings: Settings, tmp_path: Path) -> None:
    from loraline_flows.release import release

    first = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME)
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    assert aliases(client) == {"candidate": "1", "champion": "1"}

    # v2 misses a threshold (vLLM parity is off in tests): kept and tagged, no alias moves.
    v2 = adapter_version(demo_assets.checkpoint, tmp_path / "v2")
    out = release(adapter=str(v2), base=str(demo_assets.base), name=NAME, gate=GateThresholds(require_vllm_parity=True))
    assert out["model_version"] == "2" and out["gate"]["passed"] is False and out["gate"]["aliases_moved"] == {}
    assert aliases(client) == {"candidate": "1", "champion": "1"}
    mv2 = client.get_model_version(NAME, "2")
    assert mv2.tags["loraline.gate"] == "failed" and "vLLM parity: not run" in mv2.tags["loraline.gate.reasons"]
    assert "Gate failed: vLLM parity: not run" in mv2.description and "no alias moved" in mv2.description
    report = Path(client.download_artifacts(out["mlflow_run_id"], "report.md")).read_text()
    assert "**failed**; aliases moved: none" in report and "| vllm_parity | NO |" in report

    # v3 passes but is not promoted: only candidate moves.
    v3 = adapter_version(v2, tmp_path / "v3")
    out3 = release(adapter=str(v3), base=str(demo_assets.base), name=NAME, gate={"promote": False})
    assert out3["model_version"] == "3" and out3["gate"]["aliases_moved"] == {"candidate": "3"}
    assert aliases(client) == {"candidate": "3", "champion": "1"}

    # v4 passes and is promoted: champion moves, and the version names the one it replaced.
    v4 = adapter_version(v3, tmp_path / "v4")
    out4 = release(adapter=str(v4), base=str(demo_assets.base), name=NAME)
    assert aliases(client) == {"candidate": "4", "champion": "4"}
    assert client.get_model_version(NAME, "4").tags["loraline.gate.previous_champion"] == "1"
    lineage = json.loads(Path(client.download_artifacts(out4["mlflow_run_id"], "lineage.json")).read_text())
    assert lineage["gate"]["passed"] is True and lineage["gate"]["previous_champion"] == "1"

    # Re-running the first release changes nothing: no alias moves back to v1.
    again = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME)
    assert again["model_version"] == "1" and again["existing"] is True
    assert aliases(client) == {"candidate": "4", "champion": "4"}
    assert first["gate"]["passed"] is True


def test_gate_refuses_a_challenger_worse_than_the_champion(prefect_harness, demo_assets, settings: Settings,
                                                           tmp_path: Path) -> None:
    """Champion–challenger on a real MLflow registry: v1 becomes champion; v2 scores below it, so the gate refuses v2
    and `champion` stays on v1; with a tolerance covering the gap the same release passes."""
    from loraline_flows.release import release
    from loraline.evaluate import EvalReport, EvalScore
    from loraline.gate import gate_release
    from loraline.records import log_evaluation

    name = "smol-champ"
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    v1 = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=name)
    assert v1["gate"]["passed"] and v1["gate"]["checks"][-1]["detail"] == "champion: none yet; this release is compared with no one"
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {"candidate": "1", "champion": "1"}

    # The demo model scores 0 on the task (README): v1's evaluation is recorded again as a model answering 7 of the 8
    # questions, through the same call the release's evaluate step makes (tag, metrics, lineage.json).
    better = EvalReport(merged=EvalScore("merged", 8, 7, 8, 1.0), base=EvalScore("base", 8, 1, 5, 1.0), max_new_tokens=64)
    log_evaluation(name, "1", v1["mlflow_run_id"], better, settings)

    v2 = release(adapter=str(adapter_version(demo_assets.checkpoint, tmp_path / "v2")), base=str(demo_assets.base), name=name)
    assert v2["model_version"] == "2" and v2["evaluation"]["accuracy"] == 0.0
    assert v2["gate"]["passed"] is False and v2["gate"]["aliases_moved"] == {}
    assert v2["gate"]["reasons"] == ["task accuracy 0.0% (v2) is below champion v1's 87.5% (tolerance 0.0%)"]
    assert v2["gate"]["champion"] == {"version": "1", "accuracy": 0.875}
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {"candidate": "1", "champion": "1"}
    mv2 = client.get_model_version(name, "2")
    assert mv2.tags["loraline.gate"] == "failed" and "below champion v1's 87.5%" in mv2.tags["loraline.gate.reasons"]
    report = Path(client.download_artifacts(v2["mlflow_run_id"], "report.md")).read_text()
    assert "| champion v1 | 87.5% | |" in report and "— **refused**." in report

    # A tolerance that covers the gap lets the same release through; the champion's accuracy now comes from its
    # lineage.json (its tag removed), and v2 replaces v1 as champion.
    client.delete_model_version_tag(name, "1", "loraline.eval.accuracy")
    d = gate_release(v2, GateThresholds(champion_tolerance=0.9), settings)
    assert d.passed and d.checks[-1].detail == "task accuracy 0.0% (v2) is not below champion v1's 87.5% (tolerance 90.0%)"
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {"candidate": "2", "champion": "2"}
    assert client.get_model_version(name, "2").tags["loraline.gate.previous_champion"] == "1"
