"""Real training on the CPU, with transformers and peft: a LoRA fine-tune on the Text-to-SQL train split with
``transformers.Trainer`` (:func:`train_adapter`), and a brief full-weight pretraining of a random base
(:func:`pretrain_base`, for the tiny demo).

:func:`train_adapter` puts LoRA on every linear module of the decoder layers (:func:`linear_module_names`), takes the
loss on the SQL answer only, computing logits for the answer positions alone (:func:`_answer_loss`), and with LoRA on
the last layers computes the frozen ones below once per example (:class:`_FrozenBottom`). Side effects: CPU-heavy
(minutes for the real demo); writes a Trainer's checkpoints into the run folder it is given (:func:`pretrain_base`
rewrites the base's weights in place); sets torch's thread count when asked (:func:`torch_threads`,
:class:`SharedCores`); progress lines on stderr when asked (:func:`log_progress`). The demo that runs it is
:mod:`loraline.demo`'s.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from loraline import text2sql
from loraline.hf_models import base_dtype_name, compute_dtype_name, make_readable, no_checkpointing_deprecation

__all__ = [
    "SharedCores",
    "linear_module_names",
    "log_progress",
    "pretrain_base",
    "torch_threads",
    "train_adapter",
]


def log_progress(progress: bool, message: str) -> None:
    """With ``progress``, print ``message`` to stderr as a ``loraline demo:`` line (training's and the demo's)."""
    if progress:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[dim]loraline demo:[/dim] {message}")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
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


def pretrain_base(
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
    bfloat16 halves the base's memory and is faster on CPUs with bf16 instructions; ``"auto"``: the base's own dtype
    where this CPU computes it fast, else float32 (:func:`~loraline.hf_models.compute_dtype_name`). With
    ``last_layers``, the frozen layers below are computed once per example, not once per step (:class:`_FrozenBottom`; ``cache_frozen=False``
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
    if dtype == "auto":
        dtype = compute_dtype_name(base_dtype_name(base_dir))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    layers = None
    if last_layers is not None:
        n = _num_layers(model)
        layers = list(range(max(0, n - last_layers), n))
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=0.0,
        target_modules=linear_module_names(model), layers_to_transform=layers,
    )
    with no_checkpointing_deprecation():
        model = get_peft_model(model, lora)
    dataset = _ChatSqlDataset(tokenizer, text2sql.load_examples("train"))
    bottom = None
    if cache_frozen and layers and layers[0] > 0:
        bottom = _FrozenBottom(model, layers[0])
        log_progress(progress, f"computing the {layers[0]} frozen layers below the adapter once per example ({len(dataset)})")
        bottom.precompute(model, dataset, tokenizer.pad_token_id)
        bottom.install()
    extra_saves = {int(n) for n in save_at if 0 < int(n) < steps}

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            # About five lines per run: enough to see the loss fall.
            every = max(args.logging_steps, state.max_steps // 5)
            if logs and "loss" in logs and (state.global_step % every == 0 or state.global_step == args.logging_steps):
                log_progress(progress, f"step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:.3f}")

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
    with no_checkpointing_deprecation():
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
