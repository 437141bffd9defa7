"""Merging plain LoRA into a base's safetensors without building the peft model: read the base's tensors, add each
adapted layer's ``(B @ A) * scaling`` in float32, and write the files ``save_pretrained`` would write, one tensor at a
time, hashing the bytes as they are written.

Bit for bit what :mod:`loraline.merge`'s peft path (``merge_and_unload(safe_merge=True)`` in a float32 copy, then the
base's dtype) writes: the same float32 operations in the same order (peft's ``get_delta_weight``: ``B @ A``, transposed
for ``fan_in_fan_out``, times ``scaling``; then ``W + delta``, cast to the output dtype), the same tensor names, order,
shards and safetensors header, the same config.json. Which layers are adapted, with which rank, alpha and scaling
(rsLoRA, ``rank_pattern``, ``alpha_pattern``) and ``fan_in_fan_out`` (GPT-2's Conv1D) is decided by peft itself: its
matching and pattern functions, run over the base's architecture built on the meta device (no weights).

:func:`plan_direct_merge` says whether an adapter can be merged this way; anything it does not prove plain (DoRA and
other LoRA variants, LoRA on embeddings or convolutions, ``modules_to_save``, trainable tokens, LoRA biases, other peft
types, adapter keys peft would not load 1:1, a base whose tensors transformers would rename, a target tied to another
weight) gets a reason, and the caller takes the peft path.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraline.errors import MergeError
from loraline.settings import Settings

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Prefix peft gives the adapter's keys (PeftModel.base_model.model is the transformers model).
_PEFT_PREFIX = "base_model.model."
# safetensors dtype names whose tensors `model.to(dtype)` casts; anything else but integers and bool is not plain.
_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_KEPT = {"I64", "I32", "I16", "I8", "U8", "BOOL"}
_ST_NAME = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_IN_FLIGHT = 4  # tensors handed to the writer threads and not yet written and hashed
_HASH_THREAD_CPUS = 2  # from this many usable CPUs on, the output is hashed in a thread of its own, when one is idle
_THREADED_CPUS = 4  # from this many on, it is also written from a thread of its own
_CHUNK_BYTES = 1 << 19  # float32 rows merged at a time (fits a core's L2 cache)
# The LoraConfig values under which peft's LoRA layer is plain ``W + (B @ A) * scaling``. Other keys (variants, new
# features) must be empty/false; init_lora_weights only matters at init time for these values (PiSSA, OLoRA, LoftQ, ...
# rewrite the base weights when loaded, so they are not plain).
_PLAIN_INIT = (True, False, "gaussian")
_INTERPRETED = {
    # applied by peft's own matching and pattern functions, or checked against the adapter's keys
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "init_lora_weights",
    # no effect on merged weights
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
    "lora_dropout", "megatron_core", "qalora_group_size", "bias",
}


class NotDirect(Exception):  # noqa: N818 - a reason, not a failure: the peft path takes over
    """Why an adapter is merged with peft instead: the message is recorded on the merged model."""


@dataclass(frozen=True)
class Target:
    """One adapted weight: the adapter's two keys and peft's scaling and orientation for it."""

    a_key: str
    b_key: str
    scaling: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class Tensor:
    """One output tensor: where its bytes come from in the base, and its output dtype."""

    name: str
    file: Path  # base safetensors file
    dtype: str  # safetensors dtype in the base file
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in ``file``
    end: int
    out_dtype: str  # safetensors dtype written

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_bytes(self) -> int:
        return self.numel * _ITEMSIZE[self.out_dtype]


@dataclass(frozen=True)
class DirectPlan:
    """Everything the direct merge writes, decided before a byte of weights is read."""

    shards: dict[str, list[Tensor]]  # output file name -> its tensors, in safetensors' on-disk order
    index: dict[str, Any] | None  # model.safetensors.index.json when sharded (as save_pretrained writes it)
    targets: dict[str, Target]  # base tensor name -> its LoRA
    adapter_file: Path
    compute_dtype: str
    config: Any  # the transformers config to save (dtype and architectures set as save_pretrained sets them)
    generation_config: Any  # the one transformers derives from config.json, for a base without one; else None
    parameters: int
    tied_embeddings: bool


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise NotDirect(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise NotDirect(f"{path}: a {n}-byte safetensors header is not plausible")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _base_files(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return [base_dir / f for f in sorted(set(weight_map.values()))]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise NotDirect(f"{base_dir} has no model.safetensors or model.safetensors.index.json")


def _dtype_order() -> dict[str, int]:
    """safetensors' on-disk order of dtypes (it sorts tensors by dtype, descending, then by name), read from the
    library itself: zero-size tensors of each dtype serialized once."""
    import torch
    from safetensors.torch import save

    names = {**_ST_NAME, "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
             "uint8": "U8", "bool": "BOOL"}
    blob = save({st: torch.empty(0, dtype=getattr(torch, t)) for t, st in names.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    return {st: i for i, st in enumerate(header)}


def safetensors_header(tensors: list[Tensor], metadata: dict[str, str]) -> bytes:
    """The header bytes safetensors writes for ``tensors`` (already in on-disk order): its length, compact JSON with
    ``__metadata__`` first, padded with spaces to a multiple of 8."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.out_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.out_bytes]}
        offset += t.out_bytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def plan_direct_merge(adapter_dir: Path, base_dir: Path, out_dtype: str, compute_dtype: str, settings: Settings,
                      max_shard_size: int | str) -> DirectPlan:
    """What the direct merge of ``adapter_dir`` into ``base_dir`` writes; raises :class:`NotDirect` with the reason
    when the adapter or base is not one it merges exactly as peft would. Reads configs and safetensors headers only."""
    try:
        return _plan(Path(adapter_dir), Path(base_dir), out_dtype, compute_dtype, settings, max_shard_size)
    except NotDirect:
        raise
    except Exception as e:  # noqa: BLE001 - anything unexpected in the inputs is peft's to merge or to refuse
        raise NotDirect(f"not planned ({type(e).__name__}: {e})") from e


def _plan(adapter_dir: Path, base_dir: Path, out_dtype: str, compute_dtype: str, settings: Settings,
          max_shard_size: int | str) -> DirectPlan:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter_file = adapter_dir / ADAPTER_WEIGHTS
    if not adapter_file.is_file():
        raise NotDirect(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    raw = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if raw.get("peft_type") != "LORA":
        raise NotDirect(f"peft_type {raw.get('peft_type')!r} is not LORA")
    if raw.get("init_lora_weights", True) not in _PLAIN_INIT:
        raise NotDirect(f"init_lora_weights {raw.get('init_lora_weights')!r} changes the base weights when loaded")
    if raw.get("bias", "none") != "none":
        raise NotDirect(f"bias {raw.get('bias')!r}: the adapter trains base biases")
    if set_keys := sorted(k for k, v in raw.items() if k not in _INTERPRETED and v not in (None, False, {}, [], "")):
        raise NotDirect(f"adapter_config.json sets {', '.join(f'{k}={raw[k]!r}' for k in set_keys)}")
    if isinstance(raw.get("target_modules"), str) and raw["target_modules"] == "all-linear":
        raise NotDirect("target_modules 'all-linear' is expanded by peft at load time")

    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=settings.trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise NotDirect("the base is quantized")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, out_dtype),
                                                 trust_remote_code=settings.trust_remote_code)
    if model.is_remote_code():
        raise NotDirect("the base's architecture is remote code")
    output = _output_tensors(model)  # names save_pretrained writes, in state_dict order -> shape
    tied_names = {n for pair in getattr(model, "all_tied_weights_keys", {}).items() for n in pair}
    parameters = sum(p.numel() for p in model.parameters())
    generation_config = None
    if model.can_generate() and not (base_dir / "generation_config.json").is_file():
        # What from_pretrained gives a model whose directory has none (adjust_generation_fn); one the base has is copied.
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_pretrained(str(base_dir), config_file_name="config.json",
                                                             _from_model_config=True)
    targets = _peft_targets(adapter_dir, adapter_file, model)

    # The base's tensors must be exactly those transformers would save back (no renames, nothing dropped or added).
    found: dict[str, Tensor] = {}
    for f in _base_files(base_dir):
        header, data = read_header(f)
        for name, info in header.items():
            dt = info["dtype"]
            if dt not in _FLOATS and dt not in _KEPT:
                raise NotDirect(f"{f.name}: tensor {name} is {dt}")
            start, end = info["data_offsets"]
            found[name] = Tensor(name, f, dt, tuple(info["shape"]), data + start, data + end,
                                 _ST_NAME[out_dtype] if dt in _FLOATS else dt)
    if set(found) != set(output):
        extra, missing = sorted(set(found) - set(output))[:3], sorted(set(output) - set(found))[:3]
        raise NotDirect(f"the base's tensor names are not the ones transformers saves back (extra {extra}, missing {missing})")
    for name, shape in output.items():
        if found[name].shape != shape:
            raise NotDirect(f"{name} is {list(found[name].shape)} in the base, {list(shape)} in its architecture")
    for name, t in targets.items():
        if name not in found or name in tied_names:
            raise NotDirect(f"LoRA target {name} is {'tied to another weight' if name in tied_names else 'not a saved weight'}")
        if found[name].dtype not in _FLOATS:
            raise NotDirect(f"LoRA target {name} is {found[name].dtype}")

    shards, index = _shard(output, found, max_shard_size, parameters)
    config.dtype = out_dtype  # as save_pretrained sets them on the model's config
    config.architectures = [type(model).__name__]
    return DirectPlan(shards, index, targets, adapter_file, compute_dtype, config, generation_config, parameters,
                      bool(getattr(config, "tie_word_embeddings", False)))


def _output_tensors(model: Any) -> dict[str, tuple[int, ...]]:
    """What ``save_pretrained`` writes of ``model`` once loaded from a checkpoint with the same tensor names (the
    caller checks that): its state dict minus tied duplicates, in the order transformers reverts weight conversions
    in (by name, numbers numerically; it decides how shards are cut), when that renames nothing."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    # from_pretrained keeps the conversions that matched a checkpoint name; with the names saved as they are loaded,
    # none did.
    model._weight_conversions = []
    reverted = revert_weight_conversion(model, dict(state))
    if set(reverted) != set(state):
        raise NotDirect(f"transformers renames {type(model).__name__}'s weights when saving")
    if model._keys_to_ignore_on_save:
        raise NotDirect(f"{type(model).__name__} drops keys when saving")
    return {k: tuple(v.shape) for k, v in reverted.items()}


def _peft_targets(adapter_dir: Path, adapter_file: Path, model: Any) -> dict[str, Target]:
    """The weights peft adapts in the meta-device ``model``, with the scaling and orientation peft gives each: its own
    ``check_target_module_exists`` and ``get_pattern_key`` decide, as ``LoraModel`` does when it loads the adapter
    (``_create_and_replace``: rank and alpha from ``rank_pattern``/``alpha_pattern``; ``LoraLayer.update_layer``:
    ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA; ``dispatch_default``: fan_in_fan_out for Conv1D only), without
    building its layers (that took 0.09 s for 84 layers). Checked one to one against the adapter's keys and shapes."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from transformers.pytorch_utils import Conv1D

    config = LoraConfig.from_pretrained(str(adapter_dir))
    if config.target_modules is None or config.target_parameters:
        raise NotDirect("the adapter names no target_modules (peft picks them by architecture)")
    targets: dict[str, Target] = {}
    shapes: dict[str, tuple[int, int]] = {}  # weight name -> (out_features, in_features)
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if type(module) is torch.nn.Linear:
            fan_in_fan_out, shapes[f"{name}.weight"] = False, (module.out_features, module.in_features)
        elif type(module) is Conv1D:  # weight stored (in, out)
            fan_in_fan_out, shapes[f"{name}.weight"] = True, (module.nf, module.weight.shape[0])
        else:
            raise NotDirect(f"LoRA target {name} is a {type(module).__name__}, not a Linear layer")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        if r <= 0:
            raise NotDirect(f"rank {r} for {name}")
        targets[f"{name}.weight"] = Target(f"{_PEFT_PREFIX}{name}.lora_A.weight", f"{_PEFT_PREFIX}{name}.lora_B.weight",
                                           alpha / math.sqrt(r) if config.use_rslora else alpha / r, fan_in_fan_out)
        shapes[f"{name}.weight"] += (r,)  # type: ignore[assignment]
    if not targets:
        raise NotDirect("peft targets no layer of this base")
    header, _ = read_header(adapter_file)
    expected = {k for t in targets.values() for k in (t.a_key, t.b_key)}
    if set(header) != expected:
        extra, missing = sorted(set(header) - expected)[:3], sorted(expected - set(header))[:3]
        raise NotDirect(f"the adapter's keys are not peft's plain LoRA keys for this base (extra {extra}, missing {missing})")
    for weight, t in targets.items():
        out_f, in_f, r = shapes[weight]  # type: ignore[misc]
        a, b = header[t.a_key], header[t.b_key]
        if a["dtype"] not in _FLOATS or b["dtype"] not in _FLOATS:
            raise NotDirect(f"{t.a_key} is {a['dtype']}, not float16/bfloat16/float32")
        if a["shape"] != [r, in_f] or b["shape"] != [out_f, r]:
            raise NotDirect(f"{t.a_key} {a['shape']} / {t.b_key} {b['shape']} do not fit {weight} ({out_f}x{in_f}) at rank {r}")
    return targets


def _shard(output: dict[str, tuple[int, ...]], found: dict[str, Tensor], max_shard_size: int | str,
           parameters: int) -> tuple[dict[str, list[Tensor]], dict[str, Any] | None]:
    """save_pretrained's shards (huggingface_hub's split, in state_dict order), each in safetensors' on-disk order."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        {n: found[n].out_bytes for n in output}, get_storage_size=lambda nbytes: nbytes,
        get_storage_id=lambda _nbytes: None, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size)
    rank = _dtype_order()
    shards = {f: sorted((found[n] for n in names), key=lambda t: (rank[t.out_dtype], t.name.encode("utf-8")))
              for f, names in split.filename_to_tensors.items()}
    index = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": parameters, **split.metadata}, "weight_map": split.tensor_to_filename}
    return shards, index


def write_direct(plan: DirectPlan, stage: Path) -> dict[str, str]:
    """Write the plan's weight files (and index) into ``stage``, one tensor at a time; returns each written file's
    sha256, computed from the bytes as they were written (the digest need not read them back). Raises MergeError naming
    the layer when a merged tensor is not finite.

    With 4 CPUs or more, one thread writes and another hashes (both release the GIL) while this one merges the next
    tensor; at most a few tensors are in flight, so memory stays at the base's page cache plus a few layers, never a
    second copy of the model."""
    import torch
    from safetensors.torch import load_file

    lora = load_file(str(plan.adapter_file))  # the adapter: a few percent of the base
    sums: dict[str, str] = {}
    # Read-only maps of the base's files: tensors are read in place (the page cache), never copied to be read (the
    # kernel maps 16 pages per fault: 1.5k faults for 200 MB). Not closed explicitly: a view of one may outlive this
    # loop by a reference; the last one unmaps it.
    maps: dict[Path, mmap.mmap] = {}
    in_flight: deque[tuple[Future[Any], Future[Any]]] = deque()
    # Scratch memory reused from layer to layer (fresh allocations of this size cost a page fault per 4 KiB: 40k per
    # 100M-parameter merge): the float32 delta, and one output buffer per tensor that may still be in flight.
    sizes = [t.out_bytes for ts in plan.shards.values() for t in ts if t.name in plan.targets]
    scratch = _Scratch(torch, max((t.numel for ts in plan.shards.values() for t in ts if t.name in plan.targets), default=0),
                       max(sizes, default=0), _IN_FLIGHT + 1)

    def drain(keep: int) -> None:
        while len(in_flight) > keep:
            for fut in in_flight.popleft():
                fut.result()

    # With a core to spare, hashing (and from 4 CPUs writing) runs beside the merging (both release the GIL), each in
    # order in its own thread; a chunk is dropped once both are done with it. merge_bench's model on 2 cores, the
    # three ways interleaved in one process, 9 runs each: at load average 0.9, 0.38 s inline, 0.29 s with a writer
    # and a hasher thread, 0.27 s with a hasher thread only (the write is a memcpy into the page cache: handing it off
    # costs more than it saves on 2 cores); at load average 4.9 (other jobs on both cores), 1.13 s inline, 1.04 s and
    # 1.40 s: a thread then waits for a core. So threads only while the load average leaves a core idle.
    cpus, spare = _cpus()
    sources: dict[Path, Any] = {}
    with (ThreadPoolExecutor(1, "merge-write") if cpus >= _THREADED_CPUS and spare >= 1.5 else _Inline()) as writer, \
            (ThreadPoolExecutor(1, "merge-hash") if cpus >= _HASH_THREAD_CPUS and spare >= 0.5 else _Inline()) as hasher:
        try:
            for filename, tensors in plan.shards.items():
                h = hashlib.sha256()
                with open(stage / filename, "wb", buffering=0) as out:
                    head = safetensors_header(tensors, {"format": "pt"})
                    in_flight.append((writer.submit(_write, out.fileno(), head), hasher.submit(h.update, head)))
                    for t in tensors:
                        if t.file not in maps:
                            sources[t.file] = open(t.file, "rb")  # noqa: SIM115 - closed below
                            maps[t.file] = mmap.mmap(sources[t.file].fileno(), 0, flags=mmap.MAP_SHARED,
                                                     prot=mmap.PROT_READ)
                        raw = memoryview(maps[t.file])[t.start:t.end]
                        chunk = _tensor_bytes(t, raw, plan, lora, torch, scratch)
                        if chunk is raw:  # the base's own bytes: copied file to file by the kernel, hashed in place
                            job = writer.submit(_copy_range, sources[t.file].fileno(), t.start, out.fileno(), raw)
                        else:
                            job = writer.submit(_write, out.fileno(), chunk)
                        in_flight.append((job, hasher.submit(h.update, chunk)))
                        drain(_IN_FLIGHT)
                    drain(0)
                sums[filename] = h.hexdigest()
        finally:
            for futs in in_flight:
                for fut in futs:
                    fut.cancel()
            for f in sources.values():
                f.close()
    if plan.index is not None:
        text = json.dumps(plan.index, indent=2, sort_keys=True) + "\n"
        (stage / "model.safetensors.index.json").write_text(text, encoding="utf-8")
        sums["model.safetensors.index.json"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return sums


def _cpus() -> tuple[int, float]:
    """(CPUs this process may use, how many of them the 1-minute load average leaves idle; this process counts)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return cpus, cpus - load


def _write(fd: int, data: Any) -> None:
    """All of ``data`` at ``fd``'s position (one write(2) moves at most 2 GiB)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src: int, offset: int, dst: int, data: memoryview) -> None:
    """``len(data)`` bytes of ``src`` from ``offset`` appended at ``dst``'s position by the kernel (copy_file_range:
    less CPU than a write from mapped memory); written from ``data`` (the same bytes, mapped) where it cannot."""
    n, done = len(data), 0
    try:
        while done < n:
            step = os.copy_file_range(src, dst, n - done, offset + done)
            if step == 0:
                break
            done += step
    except OSError:  # another filesystem on an older kernel, or no copy_file_range: write what is left
        pass
    _write(dst, data[done:])


class _Inline:
    """An executor that runs each call at once, in the caller's thread."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_result(fn(*args))
        return fut


class _Scratch:
    """Reused buffers: one float32 delta, and a ring of output buffers (a slot is reused only after the chunk it held
    was written and hashed: at most ``slots - 1`` are in flight)."""

    def __init__(self, torch: Any, delta_numel: int, out_bytes: int, slots: int) -> None:
        self.delta = torch.empty(delta_numel, dtype=torch.float32)
        self.outs = [torch.empty(out_bytes, dtype=torch.uint8) for _ in range(slots)]
        self.next = 0

    def out(self, torch: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        buf = self.outs[self.next]
        self.next = (self.next + 1) % len(self.outs)
        n = 1
        for d in shape:
            n *= d
        return buf[: n * torch.empty(0, dtype=dtype).element_size()].view(dtype).view(shape)


def _tensor_bytes(t: Tensor, raw: memoryview, plan: DirectPlan, lora: dict[str, Any], torch: Any, scratch: _Scratch) -> Any:
    """The bytes of one output tensor: the base's own when nothing changes, else merged and/or cast."""
    target = plan.targets.get(t.name)
    if target is None and t.dtype == t.out_dtype:
        return raw
    dtype = getattr(torch, _FLOATS.get(t.dtype, "float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the given buffer is not writable": it is only read
        w = torch.frombuffer(raw, dtype=dtype).view(t.shape) if t.end > t.start else torch.empty(t.shape, dtype=dtype)
    out_dtype = getattr(torch, _FLOATS[t.out_dtype]) if t.out_dtype in _FLOATS else w.dtype
    if target is None:
        return w.to(out_dtype).view(torch.uint8).numpy().data
    # peft's LoraLayer.get_delta_weight, then merge(safe_merge=True), op for op. Its A and B are float32 (float32
    # parameters, or upcast by autocast_adapter_dtype), so are these (fresh, aligned copies, as peft's are).
    a = lora[target.a_key].to(torch.float32, copy=True)
    b = lora[target.b_key].to(torch.float32, copy=True)
    delta = scratch.delta[: b.shape[0] * a.shape[1]].view(b.shape[0], a.shape[1])
    torch.mm(b, a, out=delta)  # B @ A
    if target.fan_in_fan_out:
        delta = delta.T
    out = scratch.out(torch, t.shape, out_dtype)
    if plan.compute_dtype == "float32":
        # ``delta * scaling``, then ``W + delta`` (== w.float() + delta: IEEE addition commutes bit for bit), then the
        # cast: element-wise, so done a few hundred KiB of rows at a time while they are in cache (25% less CPU than
        # whole-tensor passes).
        step = max(1, _CHUNK_BYTES // (4 * delta.shape[1]))
        finite = True
        for r in range(0, delta.shape[0], step):
            rows = delta[r:r + step]
            rows.mul_(target.scaling)
            torch.add(rows, w[r:r + step], out=rows)
            finite = finite and math.isfinite(rows.sum().item())
            out[r:r + step].copy_(rows)  # the cast to the output dtype (what .to() does), into a reused buffer
        merged = delta
    else:  # the base loaded in the output dtype, the delta cast to it, added in it
        delta.mul_(target.scaling)
        merged = w.to(out_dtype, copy=True)
        merged += delta.to(out_dtype)
        finite = math.isfinite(merged.sum().item())
        out.copy_(merged)
    # safe_merge's intent, cheaply: a sum is finite whenever every element is (NaN and inf propagate); only when it is
    # not does the element-wise check run, so a sum that merely overflowed is not mistaken for broken weights.
    if not finite and not torch.isfinite(merged).all():
        raise MergeError(f"merging {target.a_key} / {target.b_key} into {t.name} gives non-finite weights (NaN or "
                         "inf): the adapter (or that base weight) is unusable; retrain the adapter or export it again")
    return out.view(torch.uint8).numpy().data
