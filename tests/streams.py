"""`make test`: the whole suite as two pytest processes at once, so that the cores are not left idle.

    not (docker or real)    the tiny model, vLLM on CPU, MLflow, Prefect, the UI: CPU-bound, at normal priority
    docker or real          the Docker engine + registry, the CPU base image build, the real SmolLM2 model and its
                            demo fine-tune, and the tests on them: long chains that wait on builds, pushes and
                            containers; at low priority, so that they take the CPU the first stream leaves idle

One pytest process runs them all in a row and leaves the cores a quarter idle (a CI run here: 75% busy on average,
45-55% busy for 30 minutes of its second half). Two at the same priority were slower still: after 39 minutes the
first stream had run 90 of its 177 tests (through tests/test_evaluate.py) and the real release of the second had been
running for 821 s (477 s in `make demo` alone) — torch and vLLM run as many threads as there are cores, and two
streams of them oversubscribe 2 cores. Each stream is an ordinary pytest session (`pytest -m EXPR ARGS`) with its own fixtures and
temporary directory (the tiny demo model is built once for both); the first stream prints as it goes, the second's
output follows it. Exit status: the first failure's, else 0 (a stream that `ARGS` leaves empty counts as passed).

    python tests/streams.py [PYTEST ARGS...]
"""

from __future__ import annotations

import hashlib
import shlex
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STREAMS = ("not (docker or real)", "docker or real")
NO_TESTS = 5  # pytest's exit status when nothing was selected
LOW_NICE = 10  # the second stream's nice value (inherited by the processes it starts)


def low_priority(pid: int) -> None:
    """Nice 19 for the session ``pid`` leads. With the kernel's autogroup scheduling (on where
    /proc/sys/kernel/sched_autogroup_enabled is 1) each session competes as a group, whatever its processes' nice
    values: the group's own nice is /proc/PID/autogroup (tests/conftest.py nices its background builds the same way)."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text("19")
    except OSError:
        pass


def main(args: list[str]) -> int:
    tag = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]
    root = Path(tempfile.gettempdir()) / f"loraline-streams-{tag}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "shared").mkdir()
    env = {**os.environ, "LORALINE_TEST_SHARED": str(root / "shared")}  # the tiny demo, built once (tests/conftest.py)
    started = time.monotonic()
    procs: list[tuple[str, subprocess.Popen[bytes], Path | None]] = []
    for i, expr in enumerate(STREAMS):
        cmd = [sys.executable, "-m", "pytest", "-m", expr, f"--basetemp={root / f'tmp{i}'}", *args]
        if i == 0:
            print(f"streams: {shlex.join(cmd)}", flush=True)
            procs.append((expr, subprocess.Popen(cmd, cwd=REPO, env=env), None))
        else:  # the pytest cache is the first stream's (two writers would lose each other's entries)
            cmd[3:3] = ["-p", "no:cacheprovider"]
            log = root / f"stream{i}.log"
            print(f"streams: {shlex.join(cmd)} > {log}", flush=True)
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=lambda: os.nice(LOW_NICE))
            low_priority(proc.pid)
            procs.append((expr, proc, log))
    codes = []
    try:
        for expr, proc, log in procs:
            codes.append(proc.wait())
            if log is not None:
                print(f"\n{'=' * 30} stream -m {expr!r} {'=' * 30}", flush=True)
                sys.stdout.write(log.read_text(errors="replace"))
            print(f"streams: -m {expr!r} exited {codes[-1]} after {time.monotonic() - started:.0f} s", flush=True)
    except KeyboardInterrupt:
        return 130
    finally:  # interrupted or killed: the second stream runs in a session of its own, so the terminal's Ctrl-C missed it
        for _, proc, log in procs:
            if log is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    failed = [c for c in codes if c not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(c == NO_TESTS for c in codes) else 0


if __name__ == "__main__":
    os.chdir(REPO)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a CI timeout: stop the second stream too (finally)
    sys.exit(main(sys.argv[1:]))
