"""The production stack's PostgreSQL (issue 15): a private cluster of Debian's PostgreSQL under the home, on 127.0.0.1,
password over TCP, the databases MLflow and Prefect will use; stopped and started again with its data."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from loraline.errors import ServiceError
from loraline.services.postgres import DATABASES, binaries, start_postgres, stop_postgres
from loraline.settings import Settings


def psql(url: str, sql: str, password: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"}
    return subprocess.run([str(binaries() / "psql"), url, "-tAc", sql], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture()
def reachable_home():
    """A home user postgres can enter when the tests run as root (pytest's own temporary directories are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="loraline-pg-"))
    root.chmod(0o711)
    try:
        yield Settings(home=root / "home")
    finally:
        stop_postgres(Settings(home=root / "home"))
        subprocess.run(["rm", "-rf", str(root)])


def test_postgres_starts_with_password_auth_on_loopback_and_keeps_its_data(reachable_home: Settings) -> None:
    s = reachable_home
    pg = start_postgres(s)
    password = pg.password_file.read_text().strip()
    assert oct(pg.password_file.stat().st_mode & 0o777) == "0o600" and len(password) >= 24
    assert pg.url("mlflow") == f"postgresql://postgres@127.0.0.1:{pg.port}/mlflow"  # no password in what is shown
    url = pg.url("mlflow")
    # Over TCP the password is required: a wrong one is refused, the right one connects.
    wrong = psql(url, "SELECT 1", "not-the-password")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, wrong.stderr
    ok = psql(pg.url_with_password("mlflow"), "SHOW listen_addresses", "")  # the URL the servers will be given
    assert ok.returncode == 0 and ok.stdout.strip() == "127.0.0.1", ok.stderr
    names = set(psql(url, "SELECT datname FROM pg_database", password).stdout.split())
    assert set(DATABASES) <= names
    # The password is in no log the service left and on no running process's command line.
    log = (s.home / "services" / "postgres" / "log").read_text()
    assert password not in log and "postgres" in log
    cmdlines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
    assert any(f"-p\0{pg.port}\0".encode() in c for c in cmdlines)  # the server's own command line is among them
    assert not any(password.encode() in c for c in cmdlines)

    assert psql(url, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)", password).returncode == 0
    assert start_postgres(s) == pg  # running: kept as it is
    assert stop_postgres(s) is True and stop_postgres(s) is False
    assert psql(url, "SELECT 1", password).returncode != 0  # stopped: nothing listens
    again = start_postgres(s)
    assert again.port == pg.port
    assert psql(url, "SELECT x FROM kept", password).stdout.strip() == "42"


@pytest.mark.skipif(os.geteuid() != 0, reason="as a non-root user the cluster runs as that user")
def test_a_home_user_postgres_cannot_enter_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    s = Settings(home=closed / "home")
    with pytest.raises(ServiceError, match=rf"user 'postgres'.* cannot enter /\S+ \(the loraline home {re.escape(str(s.home))} "
                                           r"is below it\): put LORALINE_HOME where"):
        start_postgres(s)
    assert not (closed / "home" / "services").exists()
