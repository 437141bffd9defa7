"""The MLflow seam (loraline.tracking) and the resume plan of a release, on a real SQLite MLflow store, without Prefect."""

from __future__ import annotations

import json
import socket

import pytest

from loraline.errors import RegistryError, SettingsError, TrackingError
from loraline.resume import resume_plan
from loraline.settings import Settings
from loraline.tracking import LINEAGE_FILE, NOT_FOUND, UNAVAILABLE, connect


def _run_with_lineage(t, lineage: dict) -> str:
    exp = t.experiment_id("seam")
    run_id = t.client.create_run(exp).info.run_id
    t.log_texts(run_id, {LINEAGE_FILE: json.dumps(lineage)})
    return run_id


def test_lineage_is_read_and_updated_in_one_place(settings: Settings) -> None:
    t = connect(settings)
    run_id = _run_with_lineage(t, {"model_name": "seam", "images": []})
    out = t.update_lineage(run_id, evaluation={"accuracy": 0.5},
                           change=lambda lin: lin["images"].append({"mode": "merged"}))
    assert out == t.lineage(run_id) == {"model_name": "seam", "images": [{"mode": "merged"}], "evaluation": {"accuracy": 0.5}}
    assert t.experiment_id("seam") == t.client.get_run(run_id).info.experiment_id  # found, not created twice


def test_a_run_without_lineage_is_named_and_mlflow_failures_become_ours(settings: Settings) -> None:
    t = connect(settings)
    bare = t.client.create_run(t.experiment_id("seam")).info.run_id
    with pytest.raises(TrackingError, match=f"MLflow run {bare} has no lineage.json: it was not made by a loraline release") as e:
        t.lineage(bare)
    assert e.value.error_code == NOT_FOUND and isinstance(e.value, RegistryError)
    with pytest.raises(TrackingError) as e:  # MLflow's own exception, arriving as ours with MLflow's code
        t.client.get_model_version("no-such-model", "1")
    assert e.value.error_code == NOT_FOUND and "no-such-model" in str(e.value)


def test_a_server_that_does_not_answer_is_said_so(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    t = connect(settings.model_copy(update={"tracking_uri": f"http://127.0.0.1:{port}", "registry_uri": None}))
    with pytest.raises(TrackingError, match=f"the MLflow server at http://127.0.0.1:{port} does not answer: start it again") as e:
        t.client.search_registered_models()
    assert e.value.error_code == UNAVAILABLE


def test_an_unknown_scheme_is_a_setting_to_fix(settings: Settings) -> None:
    with pytest.raises(SettingsError, match="LORALINE_TRACKING_URI 'postgresq://db/mlflow': MLflow does not know the scheme"):
        connect(settings.model_copy(update={"tracking_uri": "postgresq://db/mlflow"}))


@pytest.mark.parametrize("existing, want", [
    (None, dict(register=True, evaluate=True, benchmark=True, image=True, gate=True)),
    # empty sections are missing ones
    ({"evaluation": {}, "benchmark": {}, "images": [{"mode": "merged"}], "gate": {}},
     dict(register=False, evaluate=True, benchmark=True, image=False, gate=True)),
    # released, evaluated, benchmarked, imaged and gated: nothing to do, no alias moves back
    ({"evaluation": {"accuracy": 1}, "benchmark": {"x": 1}, "images": [{"mode": "merged"}], "gate": {"passed": True}},
     dict(register=False, evaluate=False, benchmark=False, image=False, gate=False)),
    # an image of another mode does not count; a report that failed is redone with its gate; never gated: gate now
    ({"evaluation": {"a": 1}, "benchmark": {"b": 1}, "images": [{"mode": "lora"}], "gate": {"passed": True}},
     dict(register=False, evaluate=False, benchmark=False, image=True, gate=True)),
    ({"evaluation": {"a": 1}, "benchmark": {"b": 1}, "images": [{"mode": "merged"}], "gate": {}, "failed_step": "report"},
     dict(register=False, evaluate=False, benchmark=False, image=False, gate=True)),
    ({"evaluation": {"a": 1}, "benchmark": {"b": 1}, "images": [{"mode": "merged"}]},
     dict(register=False, evaluate=False, benchmark=False, image=False, gate=True)),
])
def test_resume_plan_runs_only_what_is_missing(existing: dict | None, want: dict, settings: Settings) -> None:
    plan = resume_plan(existing, settings.model_copy(update={"eval": True, "bench": True}), "merged")
    assert {k: getattr(plan, k) for k in want} == want
    assert plan.done == (not want["gate"])


def test_resume_plan_follows_what_is_asked(settings: Settings) -> None:
    off = settings.model_copy(update={"eval": False, "bench": False})
    plan = resume_plan({"images": [], "gate": {"passed": True}}, off, "none")
    assert plan.done  # no evaluation, benchmark or image asked for: the gated release stays as it is
    assert not resume_plan(None, off, "none").evaluate and resume_plan(None, off, "none").register


def test_resume_plan_exports_the_gguf_types_a_gated_release_lacks(settings: Settings) -> None:
    """Issue 17 on releases gated before: the GGUF types asked for now that the release has not exported are exported,
    and the gate and report run again with them (as for an image of a new mode); the ones it has are not redone."""
    s = settings.model_copy(update={"eval": True, "bench": True})
    gated = {"evaluation": {"a": 1}, "benchmark": {"b": 1}, "images": [{"mode": "merged"}], "gate": {"passed": True},
             "gguf": [{"quant": "q8_0", "sha256": "ab"}]}
    assert resume_plan(gated, s, "merged", ("q8_0",)).done and resume_plan(gated, s, "merged").done
    plan = resume_plan(gated, s, "merged", ("f16", "q8_0"), gguf_required=True)
    assert plan.gguf == ("f16",) and plan.gate and not (plan.evaluate or plan.benchmark or plan.image or plan.done)
    before = {k: v for k, v in gated.items() if k != "gguf"}  # released before the GGUF step existed: auto's types now
    assert resume_plan(before, s, "merged", ("f16", "q8_0")).gguf == ("f16", "q8_0")
    # The converter refused this model before: auto does not try again (a re-run stays cached); a type by name does.
    refused = {**before, "gguf": [], "gguf_skipped": "llama.cpp does not know this model's tokenizer"}
    assert resume_plan(refused, s, "merged", ("f16", "q8_0")).done
    assert resume_plan(refused, s, "merged", ("f16",), gguf_required=True).gguf == ("f16",)
    assert resume_plan(None, s, "merged", ("q8_0",)).gguf == ("q8_0",)


def test_a_release_being_stepped_by_a_live_process_is_waited_for_then_taken(settings: Settings) -> None:
    """Two releases of one adapter at once (the CI run of e5a4906: both evaluated one version, and MLflow's SQLite store
    refused the second `loraline.eval.gain` tag). The steps after registration belong to one process at a time: the
    version tag `loraline.owner`; another release waits for it, takes it when that process has ended, gives it back."""
    import subprocess

    from loraline.registry import OWNER, owner, release_claim, settled_release

    t = connect(settings)
    run_id = _run_with_lineage(t, {"model_name": "held", "model_version": "1", "images": []})
    t.client.set_terminated(run_id)  # registered: its run finished
    t.client.create_registered_model("held")
    other = subprocess.Popen(["sleep", "60"])  # the process running the version's steps, alive on this host
    holder = f"{socket.gethostname()}:{other.pid}"
    mv = t.client.create_model_version("held", f"runs:/{run_id}/model", run_id=run_id, tags={OWNER: holder})
    said: list[str] = []
    try:
        with pytest.raises(RegistryError, match=f"models:/held/1: another release \\({holder}\\) has been running its steps "
                                                f"for .* s; wait for it, or delete the tag {OWNER} of that version"):
            settled_release(t, "held", [mv], steps_wait_s=2, progress=said.append)
        assert said == [f"models:/held/1 has these digests; {holder} is running its steps: waiting"]
    finally:
        other.kill()
        other.wait()
    found = settled_release(t, "held", [mv], steps_wait_s=2)  # that process has ended: this one takes the steps
    assert found is not None and found["model_version"] == "1" and found["existing"] is True
    assert t.version_tags("held", "1")[OWNER] == owner()
    release_claim("held", "1", settings)
    assert OWNER not in t.version_tags("held", "1")
    # A process on another host cannot be seen from here: it is waited for, never taken over.
    t.client.set_model_version_tag("held", "1", OWNER, "another-host:1")
    with pytest.raises(RegistryError, match="another release \\(another-host:1\\)"):
        settled_release(t, "held", [mv], steps_wait_s=1)


def test_steps_are_given_back_when_they_end_but_not_to_a_server_that_does_not_answer(settings: Settings) -> None:
    """`holding`: the version's steps go back when they end, done or failed; after MLflow stopped answering the tag
    stays (asking again would wait out the client's retries) and names this process, which will end."""
    from loraline.registry import OWNER, holding, owner

    t = connect(settings)
    run_id = _run_with_lineage(t, {"model_name": "held"})
    t.client.create_registered_model("held")
    t.client.create_model_version("held", f"runs:/{run_id}/model", run_id=run_id)
    for error, kept in ((None, False), (RuntimeError("a step failed"), False),
                        (TrackingError("the MLflow server does not answer", error_code=UNAVAILABLE), True)):
        t.client.set_model_version_tag("held", "1", OWNER, owner())
        try:
            with holding("held", "1", settings):
                if error is not None:
                    raise error
        except (RuntimeError, TrackingError) as e:
            assert e is error
        assert (OWNER in t.version_tags("held", "1")) is kept, error
