"""Loading HF/peft models and tokenizers (merge, parity, evaluation, the HF benchmark, the tiny models, training): one
place that decides dtype, safetensors-only and remote code."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraline.settings import Settings

_DTYPES = ("bfloat16", "float16", "float32")


def base_dtype_name(model_dir: Path) -> str:
    """The dtype a model directory's config.json declares (``dtype`` or legacy ``torch_dtype``)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in _DTYPES else "float32"


def cpu_has_fast(dtype_name: str) -> bool:
    """Whether this CPU multiplies ``dtype_name`` matrices with instructions of its own (oneDNN's check: AVX-512 for
    bf16, AVX-512-FP16 or AMX for fp16; ``ONEDNN_MAX_CPU_ISA`` lowers it). float32 always."""
    import torch

    if dtype_name == "bfloat16":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype_name == "float16":
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def compute_dtype_name(declared: str, device: str = "cpu") -> str:
    """The dtype transformers runs a model stored in ``declared`` in: the stored one, except bf16/fp16 on a CPU without
    instructions for it, where float32 is several times faster (one thread, 64x576 by 576x1536 on an AVX2-only AMD EPYC:
    37.8 GFLOP/s in float32, 6.7 in bf16) and at least as exact. Merged weights are still written in ``declared``."""
    return declared if device != "cpu" or cpu_has_fast(declared) else "float32"


# The config.json keys that bound a model's context, as vLLM reads them (ModelArchConfigConvertor): the smallest wins.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")


def context_length(model_dir: Path) -> int | None:
    """The longest sequence (prompt + output, in tokens) a model takes, from its config.json; None when it does not say.

    The smallest of :data:`CONTEXT_KEYS` (each architecture names it its own way: ``max_position_embeddings``,
    GPT-2's ``n_positions``, MPT's ``max_seq_len``, ...), looked up in the text config of multimodal models
    (``text_config``) too, and the tokenizer's ``model_max_length`` when tokenizer_config.json gives a real one, as
    vLLM does. A sliding window does not shorten it (vLLM serves the full context). RoPE scaling that would lengthen
    it is not applied: a length at most vLLM's own is always accepted, a longer one never.
    """
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    configs = [cfg] + [cfg[k] for k in ("text_config", "llm_config", "language_config") if isinstance(cfg.get(k), dict)]
    found = [int(c[k]) for c in configs for k in CONTEXT_KEYS if isinstance(c.get(k), (int, float)) and c[k] > 0]
    tok = model_dir / "tokenizer_config.json"
    if tok.is_file():
        limit = json.loads(tok.read_text(encoding="utf-8")).get("model_max_length")
        if isinstance(limit, (int, float)) and 0 < limit < 1e9:  # transformers writes 1e30 for "no limit"
            found.append(int(limit))
    return min(found) if found else None


def load_causal_lm(model_dir: Path, settings: Settings, dtype_name: str | None = None) -> Any:
    """A transformers causal LM from safetensors only, in eval mode, in the given dtype or else the one it is computed in
    on this CPU (:func:`compute_dtype_name` of the declared one)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name or compute_dtype_name(base_dtype_name(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype,
        use_safetensors=True,  # never fall back to a pickled pytorch_model.bin
        trust_remote_code=settings.trust_remote_code,
    )
    return model.eval()


def load_peft(model_dir: Path, adapter_dir: Path, settings: Settings, dtype_name: str | None = None) -> Any:
    """Base + adapter, unmerged (peft runtime), for parity and as the merge input."""
    from peft import PeftModel

    base = load_causal_lm(model_dir, settings, dtype_name)
    _resize_for_adapter(base, adapter_dir)
    # PeftModel reads adapter_model.safetensors; validation refused pickled adapters earlier.
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


@contextmanager
def no_checkpointing_deprecation() -> Iterator[None]:
    """Silence one FutureWarning that peft raises by reading transformers' deprecated
    ``is_gradient_checkpointing``: library-internal, nothing for a caller to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_tokenizer(adapter_dir: Path, base_dir: Path, settings: Settings) -> Any:
    """The adapter's tokenizer when it ships one (it may carry the fine-tune's chat template), else the base's."""
    from transformers import AutoTokenizer

    src = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_dir
    return AutoTokenizer.from_pretrained(str(src), trust_remote_code=settings.trust_remote_code)


def greedy(model: Any, input_ids: Any, *, max_new_tokens: int, pad_token_id: int | None, attention_mask: Any = None,
           **generate: Any) -> Any:
    """Greedy decoding with transformers' ``generate`` from a batch of token ids, without gradients: what parity, the
    task evaluation and the HF benchmark paths run. ``attention_mask`` defaults to all ones (equal-length prompts, no
    padding); ``generate`` goes on to ``model.generate`` (``output_logits``, ``min_new_tokens``, ``stopping_criteria``)."""
    import torch

    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id, **generate)


def _resize_for_adapter(model: Any, adapter_dir: Path) -> None:
    """Resize the base's embeddings when the adapter was trained with added tokens (saved embeddings)."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt") as st:
        rows = [st.get_slice(k).get_shape()[0] for k in st.keys() if k.endswith("embed_tokens.weight")]
    if rows and rows[0] != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows[0])


def make_readable(root: Path) -> None:
    """Files 0644, folders 0755: the directory is copied into containers that run as another user (transformers
    writes model.safetensors 0600)."""
    root.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            Path(dirpath, d).chmod(0o755)
        for f in filenames:
            Path(dirpath, f).chmod(0o644)


def save_tokenizer(tokenizer: Any, out_dir: Path, max_positions: int | None = None) -> None:
    """``save_pretrained``, with the two fixes the readers of the directory need.

    transformers 5 names the class ``TokenizersBackend``, which transformers 4 (as in many vLLM images) rejects; it
    reads ``PreTrainedTokenizerFast`` as the same class. A tokenizer without a model_max_length (a GGUF's carries none)
    gets ``max_positions``, the model's own context length, in place of transformers' 1e30 placeholder.
    """
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    if max_positions and tokenizer.model_max_length >= VERY_LARGE_INTEGER:
        tokenizer.model_max_length = int(max_positions)
    tokenizer.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # how it was loaded here, not a property of the tokenizer
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
