"""PostgreSQL for the production stack (issue 15): a private cluster of Debian's PostgreSQL under
``<home>/services/postgres/`` (``data/``, its unix socket in ``socket/``, ``log``, ``port``), listening on 127.0.0.1
only, with one database per client (:data:`DATABASES`).

Over TCP every connection needs the password (scram-sha-256); the socket, in a directory only the cluster's owner can
enter, trusts that owner. The password is made once and kept in ``password`` (0600), for the services this home starts
and for an operator; it is never an argument of a command (``initdb`` reads it from a file that is removed at once).

PostgreSQL refuses to run as root: run as root, the cluster runs as the system user ``postgres`` (Debian's package
makes it), which must be able to enter the home; a home it cannot enter is refused before anything is written, naming
the directory that stops it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from loraline.errors import ServiceError
from loraline.services.process import HOST, service_dir
from loraline.settings import Settings

NAME = "postgres"
DATABASES = ("mlflow", "prefect")
SUPERUSER = "postgres"
_FIX = "install Debian's PostgreSQL (sudo apt-get install -y postgresql)"


@dataclass(frozen=True)
class Postgres:
    port: int
    socket_dir: Path
    password_file: Path

    def server_url(self) -> str:
        """The server's URL without a database or password (what ``services status`` shows)."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}"

    def password(self) -> str:
        """The password: only ever put in the environment of a service this home starts (e.g. as PGPASSWORD)."""
        return self.password_file.read_text().strip()

    def url(self, database: str, driver: str = "postgresql") -> str:
        """The URL of ``database`` over TCP, without the password (what status prints and logs may show)."""
        return f"{driver}://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def url_with_password(self, database: str, driver: str = "postgresql") -> str:
        """The URL a service this home starts connects with: only ever put in that service's environment."""
        password = quote(self.password(), safe="")
        return f"{driver}://{SUPERUSER}:{password}@{HOST}:{self.port}/{database}"


def binaries() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else the newest of Debian's ``/usr/lib/postgresql/N/bin``."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not versions:
        raise ServiceError(f"PostgreSQL's pg_ctl is not on this machine: {_FIX}")
    return versions[-1].parent


def _owner() -> str | None:
    """The user the cluster runs as when this process is root (None: this process's own user)."""
    return SUPERUSER if os.geteuid() == 0 else None


def _as_owner(cmd: list[str]) -> list[str]:
    """``cmd`` run as the cluster's owner (:func:`_owner`)."""
    user = _owner()
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(_as_owner(cmd), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ServiceError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc.stdout


def _check_reachable(d: Path) -> None:
    """As root: user ``postgres`` must be able to enter ``d`` (every directory above it needs x for it)."""
    user = _owner()
    if user is None:
        return
    try:
        import pwd

        pwd.getpwnam(user)
    except KeyError:
        raise ServiceError(f"PostgreSQL runs as user {user!r} when started as root, and there is no such user: {_FIX}") from None
    for parent in (p for p in [*reversed(d.parents), d] if p.exists()):
        if subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(parent)], capture_output=True).returncode != 0:
            raise ServiceError(f"PostgreSQL runs as user {user!r} when started as root, and it cannot enter {parent} "
                               f"(the loraline home {d.parents[1]} is below it): put LORALINE_HOME where user {user!r} "
                               f"can enter (e.g. chmod o+x {parent}), or run as a user other than root")


def _running(data: Path) -> bool:
    if not (data / "postmaster.pid").is_file():
        return False
    return subprocess.run(_as_owner([str(binaries() / "pg_ctl"), "-D", str(data), "status"]), capture_output=True).returncode == 0


def postgres(settings: Settings) -> Postgres | None:
    """The home's cluster if it runs (creates nothing)."""
    d = settings.home / "services" / NAME
    port = d / "port"
    if not port.is_file() or not (d / "data").is_dir() or not _running(d / "data"):
        return None
    return Postgres(port=int(port.read_text().strip()), socket_dir=d / "socket", password_file=d / "password")


def start_postgres(settings: Settings, port: int = 0) -> Postgres:
    """Start the home's cluster (made on first start) and make its databases; a running one is kept. Idempotent."""
    _check_reachable(settings.home / "services" / NAME)
    bin_dir = binaries()
    d = service_dir(settings, NAME)
    data, sock, password, port_file = d / "data", d / "socket", d / "password", d / "port"
    user = _owner()
    if user:
        shutil.chown(d, user, user)
    d.chmod(0o700)
    if not password.is_file():
        stage = d / ".password"
        stage.write_text(secrets.token_urlsafe(24))
        stage.chmod(0o600)
        stage.replace(password)
    if not (data / "PG_VERSION").is_file():
        shutil.rmtree(data, ignore_errors=True)  # a cluster whose initdb did not finish
        pwfile = d / ".initdb-password"
        shutil.copyfile(password, pwfile)
        pwfile.chmod(0o600)
        if user:
            shutil.chown(pwfile, user, user)
        try:
            _run([str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale"], f"initdb of {data}")
        finally:
            pwfile.unlink(missing_ok=True)
    sock.mkdir(mode=0o700, exist_ok=True)
    if user:
        shutil.chown(sock, user, user)
    if not _running(data):
        if not port:
            recorded = port_file.read_text().strip() if port_file.is_file() else ""
            if recorded.isdigit():
                port = int(recorded)
            else:
                from loraline.server import free_port

                port = free_port()
        log = d / "log"
        log.touch()
        if user:
            shutil.chown(log, user, user)
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
              f"-p {port} -k {sock} -c listen_addresses={HOST}", "start"], f"PostgreSQL on {HOST}:{port} (log: {log})")
        port_file.write_text(str(port))
    port = int(port_file.read_text().strip())
    pg = Postgres(port=port, socket_dir=sock, password_file=password)
    psql = [str(bin_dir / "psql"), "-h", str(sock), "-p", str(port), "-U", SUPERUSER, "-d", "postgres", "-tA"]
    have = set(_run([*psql, "-c", "SELECT datname FROM pg_database"], "listing the databases").split())
    for db in DATABASES:
        if db not in have:
            _run([*psql, "-c", f'CREATE DATABASE "{db}"'], f"creating database {db}")
    return pg


def stop_postgres(settings: Settings) -> bool:
    """Stop the home's cluster if it runs (fast shutdown: open sessions are ended). True when one was stopped."""
    data = settings.home / "services" / NAME / "data"
    if not data.is_dir() or not _running(data):
        return False
    _run([str(binaries() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"], "stopping PostgreSQL")
    return True
