"""Synthetic models for the fast tests and the benchmarks, built locally (nothing is downloaded); no model is trained
here (:mod:`loraline.training` does that).

:func:`build_tokenizer` trains a byte-level BPE on the Text-to-SQL task's texts (ChatML special tokens,
:data:`CHAT_TEMPLATE`); :func:`build_llama` saves a randomly initialised (seeded) ``LlamaForCausalLM`` of any size;
:func:`build_lora` saves a peft LoRA adapter with random, non-zero factors for a given base. Side effect: each writes
model or tokenizer files (0644) into the folder it is given, and nothing else. The tiny demo built from them is
:mod:`loraline.demo`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraline import text2sql
from loraline.hf_models import make_readable, no_checkpointing_deprecation, save_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "build_llama",
    "build_lora",
    "build_tokenizer",
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
    **lora_config: Any,
) -> Path:
    """Save a peft LoRA adapter for ``base_dir`` with random, non-zero A and B; return ``out_dir``.

    peft's default init has lora_B = 0 (the adapter is a no-op); here both factors are
    drawn from N(0, init_scale) so that merging really changes the weights. No training.
    ``lora_config``: more ``LoraConfig`` fields (``use_rslora``, ``rank_pattern``, ``use_dora``, ...).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # The base's own dtype: cheap for the ~100M benchmark model; peft keeps adapters in fp32.
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, **lora_config
    )
    with no_checkpointing_deprecation():
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


def scaled_adapter(src: Path, dst: Path, factor: float) -> Path:
    """A copy of the adapter (or Trainer checkpoint) ``src`` at ``dst`` whose LoRA B matrices are multiplied by
    ``factor``: another adapter digest of the same shape, for tests and benchmarks that need several. Returns ``dst``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    save_file({k: (v * factor if "lora_B" in k else v).contiguous() for k, v in load_file(f).items()}, str(f))
    return dst
