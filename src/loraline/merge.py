"""Merge a LoRA adapter into its base, keeping the base's dtype.

Two ways, one result: plain LoRA on Linear layers is merged straight from the base's safetensors into the merged
model's (:mod:`loraline.direct_merge`: ``method`` "direct"); anything else through peft's
``merge_and_unload(safe_merge=True)`` ("peft"). Both write the same bytes wherever both apply (tests/test_direct_merge.py).

Output is content-addressed: ``<home>/merged/<adapter sha[:16]>-<base sha[:16]>/``, written to a
staging directory and renamed into place only when whole, so a crashed merge leaves nothing a
later step could mistake for a merged model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from loraline.digest import digest_dir, dir_bytes
from loraline.direct_merge import DirectPlan, NotDirect, plan_direct_merge, write_direct
from loraline.errors import MergeError
from loraline.hf_models import base_dtype_name, load_peft, load_tokenizer
from loraline.settings import Settings
from loraline.sources import FetchedAdapter, FetchedBase


# save_pretrained's default, which the merged model is written with either way (a test lowers it to compare shards).
MAX_SHARD_SIZE: int | str = "50GB"


@dataclass(frozen=True)
class MergedModel:
    """A merged model directory (plain transformers layout, vLLM-loadable)."""

    path: Path
    sha256: str
    dtype: str
    bytes: int
    parameters: int
    tied_embeddings: bool
    seconds: float  # time of the merge that produced it (0 when it was already on disk)
    method: str = "peft"  # "direct" (the base's safetensors + the LoRA deltas) or "peft" (merge_and_unload)
    fallback_reason: str | None = None  # why not "direct", when peft merged it

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _dtypes(base: FetchedBase, settings: Settings) -> tuple[str, str]:
    """(output dtype, compute dtype) of a merge under ``settings``."""
    out = base_dtype_name(base.path) if settings.merge_dtype == "auto" else settings.merge_dtype
    return out, ("float32" if settings.merge_compute_dtype == "float32" else out)


def merged_path(adapter: FetchedAdapter, base: FetchedBase, settings: Settings) -> Path:
    """Where the merge of ``adapter`` into ``base`` lives: one directory per inputs and dtypes."""
    out, compute = _dtypes(base, settings)
    return settings.merged_dir / f"{adapter.sha256[:16]}-{base.sha256[:16]}-{out}-{compute}"


def merge_key(adapter: FetchedAdapter, base: FetchedBase, settings: Settings) -> str:
    """Everything a merge's result depends on (the flow's cache key): both digests, the dtypes, and the directory it is
    written to (two homes on one Prefect result store each get their own merge: a cached result names its path)."""
    out, compute = _dtypes(base, settings)
    where = hashlib.sha256(str(merged_path(adapter, base, settings).resolve()).encode()).hexdigest()[:16]
    return f"merge-{adapter.sha256}-{base.sha256}-{out}-{compute}-{where}"


def _record(path: Path) -> Path:
    # Kept beside (not inside) the merged dir so the directory digest covers the model only.
    return path.with_name(path.name + ".json")


def _portable_tokenizer_config(path: Path) -> None:
    """Make the saved tokenizer loadable by transformers 4.x too (vLLM images may bundle it).

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, a name 4.x does not know;
    ``PreTrainedTokenizerFast`` is the same class in both. It also writes loader state
    (``is_local``, ``local_files_only``) that has no business in a released model.
    """
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def merge_adapter(adapter: FetchedAdapter, base: FetchedBase, settings: Settings) -> MergedModel:
    """Merge ``adapter`` into ``base`` and save it; bit for bit what peft's ``merge_and_unload(safe_merge=True)`` gives.

    Keeps the base's dtype (a bf16 base gives a bf16 model of about the base's size), carries
    the tokenizer, chat template and generation config, and keeps tied embeddings tied unless
    the adapter changed the output head. Plain LoRA on Linear layers is merged directly from the
    safetensors (``method`` "direct", a few tenths of a second for 100M parameters); other adapters
    through peft (``method`` "peft", ``fallback_reason`` says why). A merged weight that is not finite
    is a MergeError naming the layer. Returns the existing result when this adapter and base were
    merged before.
    """
    out = merged_path(adapter, base, settings)
    if out.is_dir() and _record(out).is_file():
        data = json.loads(_record(out).read_text())
        return MergedModel(**{**data, "path": out, "seconds": 0.0})

    dtype, compute = _dtypes(base, settings)
    t0 = time.perf_counter()
    settings.merged_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.merged_dir, prefix=".merge-") as tmp:
        stage = Path(tmp) / "model"
        plan, reason = None, "LORALINE_MERGE_METHOD=peft"
        if settings.merge_method == "auto":
            try:
                plan, reason = plan_direct_merge(adapter.path, base.path, dtype, compute, settings, MAX_SHARD_SIZE), None
            except NotDirect as e:
                reason = str(e)
        stage.mkdir()
        # The tokenizer is loaded and saved in a thread beside the weights (mostly Python and JSON, while the merge is
        # mostly torch and I/O, which release the GIL): merge_bench's model, 2 cores, 0.27 -> 0.23 s.
        with ThreadPoolExecutor(1, "merge-tokenizer") as pool:
            tokenizer = pool.submit(_save_tokenizer, adapter, base, settings, stage)
            if plan is not None:
                known = _merge_direct(plan, stage)
                tied, n_params = plan.tied_embeddings, plan.parameters
            else:
                known = {}
                tied, n_params = _merge_with_peft(adapter, base, settings, dtype, compute, stage)
            tokenizer.result()
        gen = base.path / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, stage / "generation_config.json")
        for f in stage.rglob("*"):
            if f.is_file():
                f.chmod(0o644)  # transformers writes 0600; serving containers run as non-root
        sha = digest_dir(stage, known)
        size = dir_bytes(stage)
        # Two releases of the same adapter may merge at once: the merge is deterministic, so an identical result
        # already in place is kept (a reader may be using it); a different one is moved aside, never deleted in place.
        if not (out.exists() and digest_dir(out) == sha):
            if out.exists():
                out.rename(Path(tmp) / "replaced")
            try:
                stage.rename(out)
            except OSError:
                if not (out.exists() and digest_dir(out) == sha):  # another process put a different result there
                    raise
    seconds = time.perf_counter() - t0
    result = MergedModel(out, sha, dtype, size, n_params, tied, seconds, "peft" if plan is None else "direct", reason)
    record = result.to_dict()
    record.pop("path")
    record.pop("seconds")
    _record(out).write_text(json.dumps(record, indent=2))
    return result


def _save_tokenizer(adapter: FetchedAdapter, base: FetchedBase, settings: Settings, stage: Path) -> None:
    """The tokenizer the release serves (the adapter's when it has one, else the base's), as save_pretrained writes it."""
    load_tokenizer(adapter.path, base.path, settings).save_pretrained(str(stage))
    _portable_tokenizer_config(stage / "tokenizer_config.json")


def _merge_direct(plan: DirectPlan, stage: Path) -> dict[str, str]:
    """The weights, config and generation config as save_pretrained writes them; the weight files' sha256s."""
    import torch

    # One torch thread: the sha256 of the output (one stream, one core) bounds the merge's wall time anyway, and on 2
    # shared cores two OpenMP threads made a 100M-parameter merge take 13-15 s instead of 0.4 s (each small step waits
    # at a barrier for a thread another process preempted).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        known = write_direct(plan, stage)
    finally:
        torch.set_num_threads(threads)
    plan.config.save_pretrained(str(stage))
    if plan.generation_config is not None:
        plan.generation_config.save_pretrained(str(stage))
    return known


def _merge_with_peft(adapter: FetchedAdapter, base: FetchedBase, settings: Settings, dtype: str, compute: str,
                     stage: Path) -> tuple[bool, int]:
    """peft's ``merge_and_unload(safe_merge=True)`` in the compute dtype, saved in ``dtype``: (tied, parameters)."""
    import torch

    try:
        peft_model = load_peft(base.path, adapter.path, settings, compute)
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # peft raises ValueError when safe_merge finds NaNs
        raise MergeError(f"merging {adapter.path} into {base.path} failed: {e}; the adapter's weights are unusable") from e
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    if tied:
        head, emb = merged.get_output_embeddings(), merged.get_input_embeddings()
        if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
            # The adapter changed lm_head (or the embeddings) on its own: saving them tied would
            # silently drop that change, so untie.
            merged.config.tie_word_embeddings = False
            tied = False
    merged = merged.to(getattr(torch, dtype))
    merged.save_pretrained(str(stage), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    return tied, sum(p.numel() for p in merged.parameters())
