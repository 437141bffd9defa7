"""The OCI distribution registry (the Docker/OCI image registry, not MLflow's model registry), over its HTTP API.

Nothing here talks to a Docker engine or runs anything: :func:`check_registry` checks that the registry to push to
answers ``/v2/``; :func:`registry_manifest` and :func:`registry_image` read an image's manifest, config blob and
labels (what ``loraline trace IMAGE`` needs, without pulling it); :func:`delete_manifest` removes a pushed manifest
(the image step's rollback). Credentials (:data:`Auth`) are ``settings.registry_auth``: basic auth, or the bearer-token
exchange registries like Docker Hub and GHCR want; :func:`auth_config` gives them to the Docker SDK for a push or pull.
Building and pushing the image is :mod:`loraline.image`'s.
"""

from __future__ import annotations

import re
from typing import Any

from loraline.errors import ImageError
from loraline.settings import Settings, redact

_MANIFESTS = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
])

Auth = tuple[str, str] | None  # registry (user, password); None: Docker's own credentials / anonymous


def registry_url(host: str) -> str:
    """``http://`` for loopback registries (Docker treats 127.0.0.0/8 as insecure), ``https://`` otherwise."""
    h = host.split("/")[0]
    loopback = h.split(":")[0] in ("localhost", "127.0.0.1", "[::1]") or h.startswith("127.")
    return ("http://" if loopback else "https://") + h


def check_registry(settings: Settings) -> str:
    """The registry to push to, checked to answer ``/v2/``; a clear error otherwise."""
    import httpx

    reg = settings.image_registry
    if not reg:
        raise ImageError("no image registry to push to: start one with `loraline services up`, or set "
                         "LORALINE_IMAGE_REGISTRY=HOST[:PORT][/NAMESPACE] (or LORALINE_IMAGE=none to skip the image)")
    if "@" in reg.split("/")[0] or "://" in reg:
        raise ImageError(f"LORALINE_IMAGE_REGISTRY={redact(reg)!r} must be HOST[:PORT][/NAMESPACE] without a scheme or "
                         "credentials; log in with `docker login HOST` instead")
    try:
        r = httpx.get(registry_url(reg) + "/v2/", timeout=10, auth=settings.registry_auth)
    except httpx.HTTPError as e:
        raise ImageError(f"the image registry {reg} does not answer ({_short(e)}): start it (`loraline services up`) "
                         "or fix LORALINE_IMAGE_REGISTRY; nothing was built or tagged") from e
    if r.status_code == 401 and settings.registry_auth and "basic" in r.headers.get("www-authenticate", "").lower():
        raise ImageError(f"the image registry {reg} refused LORALINE_REGISTRY_USERNAME={settings.registry_username!r} and its "
                         "password (401): fix the credentials (or the Prefect Secret block loraline-registry-password)")
    if r.status_code not in (200, 401):  # 401: it wants a token; the push authenticates with Docker's credentials
        raise ImageError(f"the image registry {reg} answered {r.status_code} on /v2/: is it a Docker registry?")
    return reg


def auth_config(auth: Auth) -> dict[str, str] | None:
    """The Docker SDK's ``auth_config`` for a push or pull (None: the engine's own, from ``docker login``)."""
    return {"username": auth[0], "password": auth[1]} if auth else None


_REF = re.compile(r"^(?P<host>[^/]+)/(?P<repo>[a-z0-9._/-]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def parse_ref(ref: str) -> tuple[str, str, str]:
    """``HOST[:PORT]/REPO[:TAG][@sha256:...]`` -> (host, repo, tag-or-digest); the host must be given."""
    m = _REF.match(ref.strip())
    if not m or ("." not in m["host"] and ":" not in m["host"] and m["host"] != "localhost"):
        raise ImageError(f"{ref!r} is not an image reference with a registry: use HOST[:PORT]/NAME:TAG or "
                         "HOST[:PORT]/NAME@sha256:DIGEST")
    if "@" in m["host"]:
        raise ImageError("image references must not carry credentials: log in with `docker login HOST` instead")
    return m["host"], m["repo"], m["digest"] or m["tag"] or "latest"


def _registry_get(host: str, path: str, accept: str | None = None, auth: Auth = None) -> Any:
    """GET a registry API path: basic auth with ``auth``, or the bearer-token dance registries like Docker Hub and GHCR
    want (anonymous, or with ``auth``)."""
    import httpx

    headers = {"Accept": accept} if accept else {}
    url = registry_url(host) + path
    with httpx.Client(timeout=30, follow_redirects=True) as http:
        r = http.get(url, headers=headers, auth=auth)
        if r.status_code == 401 and "bearer" in r.headers.get("www-authenticate", "").lower():
            params = dict(re.findall(r'(\w+)="([^"]*)"', r.headers["www-authenticate"]))
            realm = params.pop("realm", "")
            tok = http.get(realm, params=params, auth=auth).json()
            headers["Authorization"] = f"Bearer {tok.get('token') or tok.get('access_token')}"
            r = http.get(url, headers=headers)
        return r


def registry_manifest(ref: str, auth: Auth = None) -> tuple[str, dict[str, Any]]:
    """(digest, manifest) of ``ref`` from its registry; an index resolves to its linux/amd64 manifest."""
    import httpx

    host, repo, ref_part = parse_ref(ref)
    try:
        r = _registry_get(host, f"/v2/{repo}/manifests/{ref_part}", _MANIFESTS, auth)
    except httpx.HTTPError as e:
        raise ImageError(f"the registry {host} does not answer ({_short(e)}); is it running?") from e
    if r.status_code == 404:
        raise ImageError(f"{ref} is not in the registry {host} (404): check the name and tag or digest")
    if r.status_code == 401:
        raise ImageError(f"the registry {host} wants credentials for {ref} (401): set LORALINE_REGISTRY_USERNAME and "
                         "LORALINE_REGISTRY_PASSWORD (or the Prefect Secret block loraline-registry-password)")
    if r.status_code != 200:
        raise ImageError(f"the registry {host} answered {r.status_code} for {ref}: {r.text[:200]}")
    manifest = r.json()
    digest = r.headers.get("docker-content-digest") or ref_part
    if "manifests" in manifest:  # an index: pick the linux/amd64 image
        pick = next((m for m in manifest["manifests"] if m.get("platform", {}).get("architecture") == "amd64"),
                    manifest["manifests"][0])
        return registry_manifest(f"{host}/{repo}@{pick['digest']}", auth)
    return digest, manifest


def registry_image(ref: str, auth: Auth = None) -> dict[str, Any]:
    """An image's digest, labels and layer sizes, read from its registry (nothing is pulled or run)."""
    host, repo, _ = parse_ref(ref)
    digest, manifest = registry_manifest(ref, auth)
    r = _registry_get(host, f"/v2/{repo}/blobs/{manifest['config']['digest']}", auth=auth)
    if r.status_code != 200:
        raise ImageError(f"the registry {host} answered {r.status_code} for the config of {ref}")
    config = r.json()
    return {
        "ref": ref,
        "repository": f"{host}/{repo}",
        "digest": digest,
        "pinned": f"{host}/{repo}@{digest}",
        "labels": (config.get("config") or {}).get("Labels") or {},
        "created": config.get("created"),
        "layers": [int(layer["size"]) for layer in manifest.get("layers", [])],
    }


def delete_manifest(repo: str, digest: str, auth: Auth = None) -> bool:
    """Remove a pushed manifest (a release that failed after its push leaves no tag behind). True when gone."""
    import httpx

    host, name, _ = parse_ref(f"{repo}@{digest}")
    try:
        r = httpx.delete(f"{registry_url(host)}/v2/{name}/manifests/{digest}", timeout=30, auth=auth)
    except httpx.HTTPError:
        return False
    return r.status_code in (202, 404)


def _short(e: BaseException) -> str:
    """The last line of an error (the Docker SDK's explanation first), redacted: for messages here and in
    :mod:`loraline.image`."""
    text = getattr(e, "explanation", None) or str(e)
    return redact(str(text).strip().splitlines()[-1][:300]) if str(text).strip() else type(e).__name__
