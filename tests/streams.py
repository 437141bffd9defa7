"""`make test`: the whole suite as two pytest processes at once, so that neither leaves the cores idle.

    docker or real          the Docker engine + registry, the CPU base image build, the real SmolLM2 model and its
                            demo fine-tune, and the tests on them: long chains that wait on builds, pushes, containers
    not (docker or real)    everything else (the tiny model, vLLM on CPU, MLflow, Prefect, the UI)

One pytest process runs them all in a row and leaves the cores a quarter idle (a CI run here: 75% busy on average,
25-62% idle in most of its second half). Each stream is an ordinary pytest session (`pytest -m EXPR ARGS`), with its
own fixtures and its own temporary directory (the tiny demo model is built once for both); the first stream prints as it goes, the second's output follows it.
Exit status: the first failure's, else 0 (a stream that `ARGS` leaves empty counts as passed).

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
                procs.append((expr, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log))
    codes = []
    try:
        for expr, proc, log in procs:
            codes.append(proc.wait())
            if log is not None:
                print(f"\n{'=' * 30} stream -m {expr!r} {'=' * 30}", flush=True)
                sys.stdout.write(log.read_text(errors="replace"))
            print(f"streams: -m {expr!r} exited {codes[-1]} after {time.monotonic() - started:.0f} s", flush=True)
    except KeyboardInterrupt:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, proc, _ in procs:
            proc.wait()
        return 130
    failed = [c for c in codes if c not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(c == NO_TESTS for c in codes) else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main(sys.argv[1:]))
