"""What every embedded service shares: its state directory, pid file and log, start and readiness wait, stop; and
the stopping of a whole process group that the vLLM engine's subprocesses use too (:func:`kill_group`).

A service runs in a session of its own (``start_new_session=True``), so stopping it signals its process group:
the service and whatever it started. Its state lives under ``<home>/services/<name>/``: ``pid``, ``log`` and data.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from loraline.errors import ServiceError
from loraline.probe import wait_until
from loraline.settings import Settings

HOST = "127.0.0.1"
PACKAGES = {"dockerd": "docker.io", "docker-registry": "docker-registry"}


def ensure_packages(*commands: str) -> None:
    """Install the Debian packages that provide ``commands`` if any is missing (root only)."""
    missing = [PACKAGES[c] for c in commands if shutil.which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServiceError(f"missing {', '.join(commands)}: install the Debian packages {' '.join(missing)} "
                           f"(sudo apt-get install -y {' '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")


def service_dir(settings: Settings, name: str) -> Path:
    """``<home>/services/<name>``, created if missing."""
    d = settings.home / "services" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def alive_pid(d: Path) -> int | None:
    """The service's pid if it is alive (a child of this process that exited is reaped, not counted)."""
    try:
        pid = int((d / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass  # not our child (started by an earlier `services up`)
    try:
        os.kill(pid, 0)
        return pid
    except OSError:
        return None


def spawn(cmd: list[str], d: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start ``cmd`` in a session of its own, its output appended to ``d/log``, its pid written to ``d/pid``."""
    with (d / "log").open("ab") as log:
        log.write(("\n$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=cwd)  # outlives this process until `down`
    (d / "pid").write_text(str(proc.pid))
    return proc.pid


def wait_up(check: Any, what: str, d: Path, timeout_s: float = 60.0) -> None:
    """Wait until ``check()`` is true; a service that exited or a timeout raises with the last lines of its log."""
    if wait_until(check, timeout_s, interval_s=0.3, gone=lambda: "exited" if alive_pid(d) is None else None).ready:
        return
    tail = "\n".join((d / "log").read_text(errors="replace").splitlines()[-20:]) if (d / "log").exists() else ""
    raise ServiceError(f"{what} did not come up (log: {d / 'log'}):\n{tail}")


def service_port(d: Path, file: str = "url") -> int:
    """The port a service recorded in ``d/file`` (``http://HOST:PORT`` or ``HOST:PORT``) when it is free again, else a
    free one: a service restarted by ``up`` keeps its address, so clients that know it (a running release) reconnect."""
    import socket

    from loraline.server import free_port

    try:
        port = int((d / file).read_text().strip().rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: its old connections may linger
            s.bind((HOST, port))
        return port
    except (OSError, ValueError, IndexError):
        return free_port()


def state(settings: Settings, name: str, file: str) -> str | None:
    """The content of ``<home>/services/<name>/<file>`` if it exists (a stat and a read; creates nothing)."""
    try:
        return (settings.home / "services" / name / file).read_text().strip() or None
    except OSError:
        return None


def stop(d: Path, grace_s: float) -> bool:
    """Stop the service of state directory ``d`` if it runs: SIGTERM to its process group, SIGKILL after ``grace_s``,
    then its pid file is removed. True when it ran and was signalled (False: nothing to stop)."""
    return stop_together([d], grace_s)[0]


def stop_together(dirs: list[Path], grace_s: float, again_after_s: float | None = None) -> list[bool]:
    """:func:`stop` for several services at once: all are signalled, then all are waited for (one ``grace_s`` in all:
    a service that takes seconds to shut down does not hold up the others' shutdown). With ``again_after_s``, those
    still running then get SIGTERM a second time (a Prefect worker stops only at the second)."""
    signalled: dict[Path, int] = {}
    for d in dirs:
        pid = alive_pid(d) if d.exists() else None
        if pid is None:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
            signalled[d] = pid
        except ProcessLookupError:
            pass
    start = time.monotonic()
    again = again_after_s is not None
    while time.monotonic() < start + grace_s and any(alive_pid(d) is not None for d in signalled):
        if again and time.monotonic() >= start + again_after_s:
            again = False
            for d, pid in signalled.items():
                if alive_pid(d) is not None:
                    _signal_group(pid, signal.SIGTERM)
        time.sleep(0.2)
    for d, pid in signalled.items():
        if alive_pid(d) is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        (d / "pid").unlink(missing_ok=True)
    return [d in signalled for d in dirs]


def unmount_under(*roots: Path) -> None:
    """Lazily unmount every mount point below ``roots`` (deepest first), so the directories can be removed."""
    prefixes = [str(Path(r).resolve()) for r in roots]
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [ln.split()[4].encode().decode("unicode_escape") for ln in lines]
    for mp in sorted((p for p in points if any(p == r or p.startswith(r + "/") for r in prefixes)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


# --------------------------------------------------------------------------- process groups (also the vLLM engine's)


def kill_group(proc: subprocess.Popen[Any], *, grace_s: float) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group.

    SIGTERM first (with ``grace_s`` for the leader and its group to exit), then SIGKILL, then wait until no process of
    the group runs (up to 30 s: a killed engine core takes a while to give its memory back, and the caller may start
    the next engine as soon as this returns) and its orphaned zombies are reaped (up to 10 s more).
    """
    pgid = proc.pid  # a session leader's group id is its pid
    if grace_s > 0 and proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(pgid, deadline - time.monotonic())
    _signal_group(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _wait_group_gone(pgid, 30, zombies=False)
    _wait_group_gone(pgid, 10)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int, *, zombies: bool = True) -> bool:
    """Whether group ``pgid`` still has a process; with ``zombies=False`` only one still running counts (an orphaned
    zombie holds no memory and is reaped by init, here within about 2 s)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return zombies or bool(group_pids(pgid))


def _wait_group_gone(pgid: int, timeout_s: float, *, zombies: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid, zombies=zombies) and time.monotonic() < deadline:
        time.sleep(0.1)


# --------------------------------------------------------------------------- memory of a process group (server benchmarks)


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of group ``pgid``, from ``/proc/*/stat``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def group_memory(pgid: int) -> tuple[int, int, int]:
    """``(rss, hwm, processes)`` of group ``pgid`` now: the sums of ``VmRSS`` and of ``VmHWM`` (each process's own
    peak RSS) over its live processes, in bytes. A process gone between the listing and the read counts 0."""
    rss = hwm = n = 0
    for pid in group_pids(pgid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        n += 1
        for line in status.splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                kib = int(line.split()[1]) * 1024
                if line.startswith("VmRSS:"):
                    rss += kib
                else:
                    hwm += kib
    return rss, hwm, n


class PeakRss:
    """The peak resident memory of a process group while it runs: its summed ``VmRSS`` sampled every ``interval_s`` on
    a thread (the peak of the sums is what the machine had to hold at once); :meth:`stop` (before the group is killed)
    also reads the sum of every process's own ``VmHWM``, an upper bound that catches a spike between two samples
    (processes peaking at different moments are added as if at once). Bytes; 0 until the first sample."""

    def __init__(self, pgid: int, interval_s: float = 0.25) -> None:
        import threading

        self.pgid, self.interval_s = pgid, interval_s
        self.peak = self.hwm_sum = self.processes = self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pgid}", daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, int]:
        rss, hwm, n = group_memory(self.pgid)
        self.peak = max(self.peak, rss)
        self.processes = max(self.processes, n)
        self.samples += 1
        return rss, hwm

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            self._sample()

    def stop(self) -> None:
        """One last sample (and the ``VmHWM`` sum) now, then the thread ends. Idempotent."""
        if self._done.is_set():
            return
        self._done.set()
        self._thread.join(timeout=5)
        _rss, hwm = self._sample()
        self.hwm_sum = max(self.hwm_sum, hwm)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.peak, "hwm_sum_bytes": self.hwm_sum, "processes": self.processes,
                "samples": self.samples, "interval_s": self.interval_s,
                "how": "max over samples of the summed VmRSS of the server's process group (/proc/<pid>/status); "
                       "hwm_sum_bytes: the sum of each process's VmHWM at the end (an upper bound)"}
