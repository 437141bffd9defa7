"""Faults injected into real release processes: the process is SIGKILLed at a chosen point (a real SIGKILL, sent by
the process to itself from a patched MLflow or digest call), then the release is run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import mlflow_state
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
    m.digest_dir = lambda path, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
sys.argv = ["loraline", "release", *sys.argv[2:]]
from loraline_flows.cli import main
main()
"""


def release(home: Path, demo_assets, prefect_api_url: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORALINE_HOME": str(home), "LORALINE_VLLM_PARITY": "false", "LORALINE_BENCH": "false",
           "LORALINE_IMAGE": "none", "LORALINE_EVAL_EXAMPLES": "2", "PREFECT_API_URL": prefect_api_url}
    args = ["--adapter", str(demo_assets.checkpoint), "--base", str(demo_assets.base), "--name", NAME, "--json"]
    cmd = [sys.executable, "-c", KILLER, kill_at, *args] if kill_at else [str(Path(sys.executable).with_name("loraline")), "release", *args]
    # Its own process group, output to files: a SIGKILLed CLI can leave children running (an ephemeral Prefect API
    # server, where no Prefect server is configured) and holding inherited pipes; like a supervisor, the test then kills
    # what is left of the group.
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
def test_sigkill_then_rerun_completes_with_one_clean_version(point: str, demo_assets, prefect_api_url: str,
                                                            tmp_path: Path) -> None:
    home = tmp_path / "home"
    killed = release(home, demo_assets, prefect_api_url, kill_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    s = Settings(home=home)
    after_kill = mlflow_state(s)
    if point == "registration":  # what the kill left: a version without lineage, its run RUNNING
        assert len(after_kill["versions"]) == 1 and len(after_kill["running"]) == 1
    else:
        assert after_kill["versions"] == [] and after_kill["running"] == []

    again = release(home, demo_assets, prefect_api_url)
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
    third = json.loads(release(home, demo_assets, prefect_api_url).stdout)
    assert third["model_version"] == out["model_version"] and third["existing"] is True
    assert mlflow_state(s) == state


def test_report_failure_rolls_the_gate_back_and_a_rerun_completes(prefect_harness, demo_assets, settings: Settings,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate moved the aliases, then the report failed (fault injected: Prefect refuses the lineage table artifact):
    the Prefect transaction's rollback hook puts the aliases back; the version says why; the re-run completes."""
    import loraline_flows.release as fr
    from helpers import adapter_version

    name = "smol-rollback"
    kw = dict(base=str(demo_assets.base), name=name)
    fr.release(adapter=str(demo_assets.checkpoint), **kw)
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    aliases = lambda: {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}  # noqa: E731
    assert aliases() == {"candidate": "1", "champion": "1"}

    real = fr.create_table_artifact

    def refused(*a, **k):
        raise RuntimeError("injected fault: the Prefect API refused the lineage artifact")

    monkeypatch.setattr(fr, "create_table_artifact", refused)
    v2 = adapter_version(demo_assets.checkpoint, tmp_path / "v2")
    with pytest.raises(RuntimeError, match="injected fault"):
        fr.release(adapter=str(v2), **kw)
    # The gate had passed v2 and moved both aliases; the rollback put them back on v1.
    assert aliases() == {"candidate": "1", "champion": "1"}
    tags = client.get_model_version(name, "2").tags
    assert tags["loraline.gate"] == "rolled-back" and "a step after the gate failed" in tags["loraline.gate.rollback"]
    assert tags["loraline.status"] == "failed" and tags["loraline.failed.step"] == "report"
    assert "injected fault" in tags["loraline.failed.reason"]
    assert mlflow_state(settings)["running"] == []

    # The re-run redoes the gate and the report (nothing else): v2 becomes candidate and champion, status restored.
    monkeypatch.setattr(fr, "create_table_artifact", real)
    out = fr.release(adapter=str(v2), **kw)
    assert out["model_version"] == "2" and out["gate"]["passed"] is True
    assert aliases() == {"candidate": "2", "champion": "2"}
    tags = client.get_model_version(name, "2").tags
    assert tags["loraline.gate"] == "passed" and tags["loraline.status"] == "registered"
    assert not [k for k in tags if k.startswith("loraline.failed")], tags
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] != [] and \
        sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]


@pytest.mark.parametrize("point", ["registration", "evaluation"])
def test_mlflow_server_killed_mid_release_then_rerun_completes(point: str, demo_assets, prefect_api_url: str,
                                                              tmp_path: Path) -> None:
    """The MLflow server (mlflow/server.sh, as `services up` starts it) is SIGKILLed while a `loraline release` runs:
    during registration (the run is RUNNING) or after it (the version exists, the evaluation runs). The release fails
    saying the server does not answer; the server comes back on the same store; the re-run completes with one version,
    no run left RUNNING, the aliases on it."""
    from loraline import services

    svc = Settings(home=tmp_path / "svc")
    url = services.start_mlflow(svc)
    port = int(url.rsplit(":", 1)[1])
    home = tmp_path / "home"
    env = {**os.environ, "LORALINE_HOME": str(home), "LORALINE_TRACKING_URI": url, "LORALINE_VLLM_PARITY": "false",
           "LORALINE_BENCH": "false", "LORALINE_IMAGE": "none", "LORALINE_EVAL_EXAMPLES": "4",
           "PREFECT_API_URL": prefect_api_url,
           # MLflow's client retries a dead server with backoff (about 2 minutes by default): shorten it here.
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    cmd = [str(Path(sys.executable).with_name("loraline")), "release", "--adapter", str(demo_assets.checkpoint),
           "--base", str(demo_assets.base), "--name", NAME, "--json"]
    client = MlflowClient(url, url)

    def seen() -> bool:  # the moment to kill the server
        try:
            exp = client.get_experiment_by_name(NAME)
            if exp is None:
                return False
            runs = client.search_runs([exp.experiment_id])
            if point == "registration":
                return any(r.info.status == "RUNNING" for r in runs)
            return any(r.info.status == "FINISHED" for r in runs) and bool(client.search_model_versions(f"name = '{NAME}'"))
        except Exception:  # noqa: BLE001 - the server is busy with the release's upload: ask again
            return False

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not seen():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the release never reached the point"
        time.sleep(0.2)
    pid = int((svc.home / "services" / "mlflow" / "pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    try:
        _out, err = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the CLI left in its group
        except ProcessLookupError:
            pass
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"Error: the MLflow server at {url} does not answer"), err[-3000:]

    # The server comes back on the same store and port; the re-run completes.
    assert services.start_mlflow(svc, port=port) == url
    try:
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
        out = json.loads(again.stdout)
        versions = client.search_model_versions(f"name = '{NAME}'")
        assert [str(v.version) for v in versions] == [str(out["model_version"])]
        runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
        assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_id, r.info.status) for r in runs]
        assert {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()} == {
            "candidate": str(out["model_version"]), "champion": str(out["model_version"])}
        tags = client.get_model_version(NAME, str(out["model_version"])).tags
        assert tags["loraline.gate"] == "passed" and tags["loraline.eval.examples"] == "4"
        if point == "registration":  # the killed release's run: ended FAILED, marked interrupted
            assert [(r.info.status, r.data.tags.get("loraline.status")) for r in runs if r.info.status != "FINISHED"] == [
                ("FAILED", "interrupted")]
        if point == "evaluation":  # the version of the killed release, finished now
            assert out["existing"] is True and str(out["model_version"]) == "1"
    finally:
        services.down(svc)


def process_groups() -> dict[int, list[tuple[int, str]]]:
    """Every live process's group id -> (pid, command line) of each process in that group (from /proc)."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        groups.setdefault(int(fields[2]), []).append((int(d.name), cmd))
    return groups


def runner_groups() -> set[int]:
    from loraline.engine import RUNNER

    return {g for g, procs in process_groups().items() if any(str(RUNNER) in c for _, c in procs)}


@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_engine_runner_hanging_or_crashing_is_killed_with_its_whole_group(fault: str, demo_merged, vllm_python: Path,
                                                                         home: Path) -> None:
    """The vLLM engine subprocess (the offline runner: parity, benchmark) hangs (SIGSTOPped 5 s into its run) until
    LORALINE_ENGINE_TIMEOUT_S (30 s here), or crashes (SIGKILLed 5 s in): a clear error with the engine's log, and nothing of its
    process group left (the runner, and the compiler probes it starts)."""
    import threading

    from loraline.engine import run_generate
    from loraline.errors import EngineError

    _, _, merged = demo_merged
    before = runner_groups()
    # The hang waits out the whole timeout: 30 s (the runner is stopped 5 s after it appears); a crash is reported when
    # it happens, so its timeout only needs room for a slow start.
    settings = Settings(engine_timeout_s=30 if fault == "hang" else 120)
    expect = (r"did not finish within 30s and was killed; raise LORALINE_ENGINE_TIMEOUT_S" if fault == "hang"
              else r"failed: exit status -9, no result line")
    seen: list[int] = []  # the runner's process group

    def strike() -> None:
        deadline = time.monotonic() + 120
        while not (new := runner_groups() - before):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        seen.extend(new)
        time.sleep(5)
        os.kill(seen[0], signal.SIGSTOP if fault == "hang" else signal.SIGKILL)

    t = threading.Thread(target=strike, daemon=True)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=expect) as err:
        run_generate(merged.path, [[1, 2, 3]] * 8, settings, max_tokens=64)
    t.join(timeout=10)
    assert "engine log" in str(err.value) and seen
    if fault == "crash":
        assert time.monotonic() - t0 < 40  # the crash is reported when it happens, not at the timeout
    time.sleep(0.5)
    assert not process_groups().get(seen[0]), process_groups().get(seen[0])  # no orphan


def test_engine_server_crashing_leaves_no_engine_core_behind(demo_merged, vllm_python: Path, home: Path) -> None:
    """vLLM's OpenAI server (the benchmark's and the image's serving process) runs its engine core as a child process;
    the API process is SIGKILLed: requests fail, and when the block ends nothing of its group is left (the engine core,
    which would otherwise hold its memory, is killed too)."""
    import httpx

    from loraline.server import serve_openai

    _, _, merged = demo_merged
    with serve_openai(merged.path, Settings(), served_model_name="crash") as server:
        group = process_groups().get(server.pid, [])
        assert len(group) >= 2, group  # the API server and its engine core
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in range(20):  # until the listening socket is gone
                httpx.get(f"{server.url}/v1/models", timeout=5)
                time.sleep(0.5)
        core = [p for p, _ in process_groups().get(server.pid, [])]
        assert core, "the engine core died with the API process: nothing left to check"
    assert not process_groups().get(server.pid), process_groups().get(server.pid)  # no orphaned engine core


def test_evaluation_failure_marks_the_version_and_the_rerun_restores_it(prefect_harness, demo_assets, settings: Settings,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step after registration fails (the task evaluation; fault injected): the version stays, marked failed with the
    step and reason, no alias moves; the re-run evaluates the same version, its status comes back, the gate passes."""
    import loraline_flows.release as fr

    name = "smol-evalfail"

    def broken(*a, **k):
        raise RuntimeError("injected fault: the evaluation database is unreadable")

    real = fr.evaluate_release
    monkeypatch.setattr(fr, "evaluate_release", broken)
    with pytest.raises(RuntimeError, match="injected fault"):
        fr.release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=name)
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    tags = client.get_model_version(name, "1").tags
    assert tags["loraline.status"] == "failed" and tags["loraline.failed.step"] == "evaluate"
    assert "injected fault" in tags["loraline.failed.reason"] and tags["loraline.failed.previous_status"] == "registered"
    state = mlflow_state(settings)
    assert state["aliases"] == [] and state["running"] == [] and state["versions"] == [(name, "1")]

    monkeypatch.setattr(fr, "evaluate_release", real)
    out = fr.release(adapter=str(demo_assets.checkpoint), base=str(demo_assets.base), name=name)
    assert out["model_version"] == "1" and out["existing"] is True and out["gate"]["passed"] is True
    tags = client.get_model_version(name, "1").tags
    assert tags["loraline.status"] == "registered" and not [k for k in tags if k.startswith("loraline.failed")]
    assert mlflow_state(settings)["aliases"] == ["candidate", "champion"]
