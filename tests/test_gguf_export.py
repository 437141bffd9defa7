"""GGUF export: the release's merged model as llama.cpp files (llama.cpp's converter and quantizer, in .venv-llama), each
checked against the merged model in transformers, recorded in MLflow and lineage.json, traceable from its digest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import loraline, mlflow_state
from loraline.errors import EngineError, SettingsError
from loraline.settings import Settings, parse_gguf

pytestmark = pytest.mark.slow
NAME = "smol-gguf"
EMPTY = {"versions": [], "aliases": [], "running": []}


def test_gguf_values_are_read_in_one_normal_form() -> None:
    assert parse_gguf("Q8_0, f16") == "f16,q8_0"
    assert parse_gguf("q4_k_m") == "q4_k_m"
    assert parse_gguf(None) == "auto" and parse_gguf("none") == "none"
    for bad in ("q3_k", "f16,none", ",", "bf16"):
        with pytest.raises(ValueError, match="f16, q8_0, q4_k_m"):
            parse_gguf(bad)


def test_a_bad_gguf_value_is_refused_before_anything_is_merged(prefect_harness, demo_assets, settings: Settings,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from loraline_flows.release import release

    with pytest.raises(SettingsError, match=r"'q3_k' is not a GGUF type loraline exports; give none, auto, or one or more of f16, q8_0, q4_k_m"):
        release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME, gguf="f16,q3_k")
    assert mlflow_state(settings) == EMPTY
    assert not settings.merged_dir.exists() or not list(settings.merged_dir.iterdir())
    # The command line refuses it as a usage error, before it starts anything.
    proc = loraline("release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base), "--name", NAME,
                    "--gguf", "q3_k", home=settings.home)
    assert proc.returncode == 2, proc.stderr
    assert "Invalid value for '--gguf'" in proc.stderr and "'q3_k' is not a GGUF type" in proc.stderr
    assert mlflow_state(settings) == EMPTY
    # Asked for explicitly without llama.cpp: refused before the merge too, saying how to get it.
    monkeypatch.setenv("LORALINE_LLAMA_PYTHON", str(settings.home / "no-such-venv" / "bin" / "python"))
    with pytest.raises(EngineError, match=r"is not an executable file; run `make setup` \(it builds .venv-llama"):
        release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME, gguf="f16")
    assert mlflow_state(settings) == EMPTY
    assert not settings.merged_dir.exists() or not list(settings.merged_dir.iterdir())


def test_image_gguf_without_a_gguf_export_is_refused_before_anything_is_merged(
        prefect_harness, demo_assets, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--image gguf` serves one of the release's GGUF exports: with `--gguf none`, or a LORALINE_IMAGE_GGUF_QUANT the
    release does not export, it is refused naming both settings, before anything is fetched, merged or registered
    (on the command line as a usage error, before Prefect starts)."""
    from loraline.errors import ImageError
    from loraline_flows.release import release

    kw = dict(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME, image="gguf")
    with pytest.raises(ImageError, match=r"--image gguf serves one of the release's GGUF files, but --gguf none .*"
                                         r"export one with --gguf q8_0"):
        release(**kw, gguf="none")
    monkeypatch.setenv("LORALINE_IMAGE_GGUF_QUANT", "q4_k_m")
    with pytest.raises(ImageError, match=r"LORALINE_IMAGE_GGUF_QUANT=q4_k_m asks the --image gguf image for a type this "
                                         r"release does not export \(--gguf f16\)"):
        release(**kw, gguf="f16")
    assert mlflow_state(settings) == EMPTY
    assert not settings.merged_dir.exists() or not list(settings.merged_dir.iterdir())
    monkeypatch.delenv("LORALINE_IMAGE_GGUF_QUANT")

    proc = loraline("release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base), "--name", NAME,
                    "--image", "gguf", "--gguf", "none", home=settings.home)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--image gguf serves one of the release's GGUF files, but --gguf none" in proc.stderr
    proc = loraline("release", "--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base), "--name", NAME,
                    "--image", "gguf", home=settings.home, LORALINE_IMAGE_GGUF_QUANT="q3_k")
    assert proc.returncode == 1 and "LORALINE_IMAGE_GGUF_QUANT='q3_k' is not a GGUF type" in proc.stderr, proc.stderr[-3000:]
    assert mlflow_state(settings) == EMPTY


def test_the_gguf_image_serves_the_chosen_export_with_its_lineage(tmp_path: Path) -> None:
    """Which export the llama.cpp image serves (q8_0, else f16, else what there is; LORALINE_IMAGE_GGUF_QUANT wins), and
    what its build context and labels hold: Dockerfile.gguf, the file as NAME.gguf, the server's wheels, lineage.json;
    labels that name the file's sha256 and the adapter, no credentials."""
    import tarfile

    from loraline.image import DOCKERFILE_GGUF, gguf_choice, labels, write_context

    def entry(quant: str) -> dict:
        return {"quant": quant, "sha256": quant * 4, "bytes": 1, "uri": f"runs:/r/gguf/model-{quant}.gguf",
                "converter": {"llama_cpp_python": "0.3.36"}}

    lineage = {"model_name": NAME, "model_version": "3", "mlflow_run_id": "run1", "tracking_uri": "http://127.0.0.1:5000",
               "adapter": {"sha256": "a" * 64, "source": "/ck"}, "base": {"sha256": "b" * 64, "source": "/base"},
               "merged": {"sha256": "m" * 64}, "gguf": [entry("f16"), entry("q4_k_m"), entry("q8_0")]}
    s = Settings(home=tmp_path / "home")
    assert gguf_choice(lineage, s)["quant"] == "q8_0"
    assert gguf_choice({**lineage, "gguf": [entry("q4_k_m"), entry("f16")]}, s)["quant"] == "f16"
    assert gguf_choice({**lineage, "gguf": [entry("q4_k_m")]}, s)["quant"] == "q4_k_m"
    assert gguf_choice(lineage, Settings(home=s.home, image_gguf_quant="Q4_K_M"))["quant"] == "q4_k_m"
    with pytest.raises(Exception, match=r"models:/smol-gguf/3 exported only q4_k_m; choose one of them"):
        gguf_choice({**lineage, "gguf": [entry("q4_k_m")]}, Settings(home=s.home, image_gguf_quant="f16"))
    with pytest.raises(Exception, match=r"models:/smol-gguf/3 has no GGUF export for --image gguf"):
        gguf_choice({**lineage, "gguf": []}, s)

    gguf, wheels = tmp_path / "model-q8_0.gguf", tmp_path / "wheels"
    gguf.write_bytes(b"GGUF" + bytes(60))
    gguf.chmod(0o600)  # as a converter may write it: the image's non-root user must still read it
    wheels.mkdir()
    (wheels / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"PK")
    ctx = write_context(tmp_path / "ctx.tar", mode="gguf", name=NAME, merged_dir=tmp_path, base_dir=tmp_path,
                        adapter_dir=tmp_path, adapter_files=None, lineage=lineage, gguf=gguf, wheels=wheels)
    with tarfile.open(ctx) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("Dockerfile").read() == DOCKERFILE_GGUF.read_bytes()
        assert json.loads(tar.extractfile("lineage.json").read())["gguf"][2]["quant"] == "q8_0"
    assert f"model/{NAME}.gguf" in members and members[f"model/{NAME}.gguf"].mode == 0o644
    assert "wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl" in members
    assert not [n for n in members if n.startswith(("base/", "adapter/"))]
    lab = labels(lineage, "gguf", "loraline/debian-python:test", entry("q8_0"))
    assert lab["org.loraline.mode"] == "gguf" and lab["org.loraline.gguf.quant"] == "q8_0"
    assert lab["org.loraline.gguf.sha256"] == "q8_0" * 4 and lab["org.loraline.adapter.sha256"] == "a" * 64
    assert "llama.cpp" in lab["org.opencontainers.image.description"]
    assert lab["org.opencontainers.image.base.name"] == "loraline/debian-python:test"


def test_a_model_llama_cpp_cannot_convert_fails_its_version_or_is_skipped_on_auto(
        prefect_harness, demo_assets, llama_python: Path, settings: Settings) -> None:
    """The tiny model's tokenizer (a BPE trained here) is one llama.cpp's converter does not know: asked for f16, the
    version is marked failed at the gguf step with the converter's reason (no alias moves); on auto the same release
    goes on, the skip recorded."""
    from loraline_flows.release import release

    with pytest.raises(EngineError, match="llama.cpp does not know this model's tokenizer"):
        release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME, gguf="f16")
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    tags = client.get_model_version(NAME, "1").tags
    assert tags["loraline.status"] == "failed" and tags["loraline.failed.step"] == "gguf"
    assert "pre-tokenizer" in tags["loraline.failed.reason"]
    assert not client.get_registered_model(NAME).aliases

    out = release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=NAME, gguf="auto")
    assert out["model_version"] == "1" and out["gguf"] == []
    assert "llama.cpp does not know this model's tokenizer" in out["gguf_skipped"]
    tags = client.get_model_version(NAME, "1").tags
    assert "loraline.failed.step" not in tags and "pre-tokenizer" in tags["loraline.gguf.skipped"]
    assert out["gate"]["passed"] is True


def test_the_gate_reports_each_gguf_file_and_limits_quantized_ones_when_asked() -> None:
    from loraline.gate import decide
    from loraline.params import GateThresholds

    def entry(quant: str, identical: int, close: int, failed: int) -> dict:
        verdict = "identical" if identical == 8 else "close" if failed == 0 else "failed"
        return {"quant": quant, "parity": {"verdict": verdict, "identical": identical, "close": close, "failed": failed,
                                           "prompts": 8}}

    lineage = {"model_name": NAME, "model_version": "1", "parity": {"prompts": 8, "identical": 8, "failed": 0},
               "gguf": [entry("f16", 6, 2, 0), entry("q8_0", 5, 3, 0), entry("q4_k_m", 2, 3, 3)]}
    d = decide(lineage, "registered", GateThresholds(champion_tolerance=None))
    check = next(c for c in d.checks if c.name == "gguf")
    assert d.passed and check.passed  # reported, not limited, by default
    assert "q4_k_m failed (2 identical, 3 close, 3 failed of 8)" in check.detail
    d = decide(lineage, "registered", GateThresholds(champion_tolerance=None, max_gguf_quant_failed=0.25))
    assert not d.passed and any("quantized <= 25% failed" in r for r in d.reasons)
    lineage["gguf"] = lineage["gguf"][:2]
    assert decide(lineage, "registered", GateThresholds(champion_tolerance=None, max_gguf_quant_failed=0.0)).passed


def test_the_gate_limits_the_task_accuracy_a_gguf_file_loses() -> None:
    from loraline.gate import decide
    from loraline.params import GateThresholds

    def entry(quant: str, accuracy: float | None, merged: float | None = 0.68) -> dict:
        acc = None if accuracy is None else {"accuracy": accuracy, "merged_accuracy": merged, "examples": 50,
                                             "drop": round(merged - accuracy, 4)}
        return {"quant": quant, "parity": {"verdict": "close", "identical": 6, "close": 2, "failed": 0, "prompts": 8},
                "accuracy": acc}

    def gguf(lineage: dict, **limits) -> tuple[bool, str]:
        d = decide(lineage, "registered", GateThresholds(champion_tolerance=None, **limits))
        check = next(c for c in d.checks if c.name == "gguf")
        assert d.passed == check.passed
        return check.passed, check.detail

    lineage = {"model_name": NAME, "model_version": "1", "parity": {"prompts": 8, "identical": 8, "failed": 0},
               "gguf": [entry("f16", 0.70), entry("q8_0", 0.68), entry("q4_k_m", 0.62)]}
    # By default a file may be at most 5 points below the merged model: q4_k_m's 6-point loss is refused, by name.
    passed, detail = gguf(lineage)
    assert not passed
    assert "f16 close (6 identical, 2 close, 0 failed of 8), task accuracy 70.0% vs merged 68.0% (+2.0 points, 50 questions)" in detail
    assert "q4_k_m close (6 identical, 2 close, 0 failed of 8), task accuracy 62.0% vs merged 68.0% (-6.0 points, 50 questions) — too low" in detail
    assert "q8_0" in detail and detail.count("too low") == 1
    assert "task accuracy at most 5.0 points below the merged model's" in detail
    # Exactly at the limit passes (recorded accuracies are rounded to 4 places: no float noise decides); None reports only.
    lineage["gguf"][2] = entry("q4_k_m", 0.63)
    assert gguf(lineage)[0]
    assert gguf(lineage, max_gguf_accuracy_drop=0.04)[0] is False
    passed, detail = gguf({**lineage, "gguf": [entry("q4_k_m", 0.10)]}, max_gguf_accuracy_drop=None)
    assert passed and "task accuracy 10.0% vs merged 68.0% (-58.0 points" in detail and "points below" not in detail
    # f16 is held to it as well; a release that ran no task evaluation has nothing to compare and passes that part.
    assert gguf({**lineage, "gguf": [entry("f16", 0.60)]})[0] is False
    passed, detail = gguf({**lineage, "gguf": [entry("f16", None), entry("q4_k_m", None)]}, max_gguf_accuracy_drop=0.0)
    assert passed and detail.count("task accuracy not measured") == 2
