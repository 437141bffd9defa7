"""Validate an adapter against its base before any weights are merged.

Reads only JSON and safetensors headers/tensors: a pickled ``adapter_model.bin`` is refused,
never loaded. Each refusal names the file and the fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from loraline.errors import InvalidAdapter
from loraline.settings import VLLM_MAX_LORA_RANKS, Settings
from loraline.sources import FetchedAdapter, FetchedBase

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)?(?:\.weight)?$"
)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ValidationReport:
    """What validation learned about an adapter; the basis of the LoRA params on the MLflow run."""

    peft_type: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    adapted_modules: int
    lora_parameters: int
    base_model_name: str | None
    use_dora: bool
    modules_to_save: tuple[str, ...]
    runtime_lora_servable: bool  # can vLLM serve it as base + --enable-lora?
    serving_max_lora_rank: int  # smallest vLLM --max-lora-rank value that fits r
    notes: tuple[str, ...]  # why it is not runtime-servable, and other warnings


def _read_config(adapter: Path) -> dict:
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise InvalidAdapter(f"{cfg_path}: missing; an adapter needs adapter_config.json (PEFT's save_pretrained writes it)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidAdapter(
            f"{cfg_path}: not valid JSON ({e}); the file is truncated or corrupt — copy it again from the training run"
        ) from e
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}; re-save the adapter with PEFT")
    return cfg


def read_safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from safetensors headers only (no weights read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except Exception as e:  # safetensors raises SafetensorError / OSError on bad headers
            raise InvalidAdapter(f"{f}: not a readable safetensors file ({e}); the file is truncated or corrupt — copy it again") from e
    return shapes


def base_weight_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of a base model directory (``*.safetensors`` only)."""
    files = sorted(base.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in base.glob("*.bin")) + sorted(p.name for p in base.glob("*.pt*"))
        hint = f" (it has {', '.join(pickles)}: pickles are never loaded)" if pickles else ""
        raise InvalidAdapter(
            f"base {base}: no *.safetensors weights{hint}; convert the base to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) and pass that directory"
        )
    return {k.removesuffix(".weight"): v for k, v in read_safetensors_shapes(files).items() if k.endswith(".weight")}


def _check_base_config(base: FetchedBase, settings: Settings) -> dict:
    cfg = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    if cfg.get("auto_map") and not settings.trust_remote_code:
        raise InvalidAdapter(
            f"base {base.source}: config.json has auto_map, so loading it runs code from the model repo; "
            "loraline does not run remote code unless you set LORALINE_TRUST_REMOTE_CODE=true"
        )
    return cfg


def _check_names(cfg: dict, base: FetchedBase, cfg_path: Path) -> None:
    want = cfg.get("base_model_name_or_path")
    if base.name and isinstance(want, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", want) and not Path(want).exists():
        if want.lower() != base.name.lower():
            raise InvalidAdapter(
                f"{cfg_path}: the adapter was trained on {want!r} but the base given is {base.name!r}; "
                f"pass --base hf://{want} (or the matching local copy)"
            )
    want_rev = cfg.get("revision")
    if base.revision and isinstance(want_rev, str) and _HEX40.match(want_rev) and want_rev != base.revision:
        raise InvalidAdapter(
            f"{cfg_path}: the adapter was trained on revision {want_rev} but the base resolved to {base.revision}; "
            f"pass --base {base.resolved.split('@')[0]}@{want_rev}"
        )


def _match_targets(targets: object, modules: set[str], cfg_path: Path) -> tuple[str, ...]:
    if targets == "all-linear":
        return ("all-linear",)
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in modules):
            raise InvalidAdapter(f"{cfg_path}: target_modules regex {targets!r} matches no module of the base; use the base the adapter was trained on")
        return (targets,)
    if not isinstance(targets, list) or not targets:
        raise InvalidAdapter(f"{cfg_path}: target_modules must be a non-empty list or a regex string, got {targets!r}")
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    missing = [t for t in targets if t not in leaves and t not in modules]
    if missing:
        raise InvalidAdapter(
            f"{cfg_path}: target module(s) {', '.join(map(repr, missing))} do not exist in the base "
            f"(its modules end in: {', '.join(sorted(leaves))}); the adapter was trained for another architecture: "
            "release it onto the base it was trained on"
        )
    return tuple(sorted(str(t) for t in targets))


def _base_shape(module: str, shapes: dict[str, tuple[int, ...]], tied: bool) -> tuple[int, ...] | None:
    if module in shapes:
        return shapes[module]
    if tied and module.endswith("lm_head"):
        # Tied embeddings: lm_head shares embed_tokens' weight and is not stored separately.
        emb = [k for k in shapes if k.endswith("embed_tokens")]
        return shapes[emb[0]] if emb else None
    return None


def validation_key(adapter: FetchedAdapter, base: FetchedBase, settings: Settings) -> str:
    """Everything a validation's verdict depends on (the flow's cache key): both digests and the settings it reads."""
    return f"validate-{adapter.sha256}-{base.sha256}-r{settings.max_lora_rank}-trc{int(settings.trust_remote_code)}"


def settings_allow(adapter_dir: Path, base_dir: Path, settings: Settings) -> bool:
    """Whether the checks of :func:`validate_adapter` whose verdict depends on the settings, not on the files alone
    (the rank against ``max_lora_rank``, a base with ``auto_map`` against ``trust_remote_code``: :func:`validation_key`),
    pass for an adapter and a local base that already passed validation once (a release of their digests). Reads two
    JSON files; everything else validation checks is fixed by the digests."""
    try:
        cfg = _read_config(Path(adapter_dir))
        base_cfg = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    except (InvalidAdapter, OSError, ValueError):
        return False
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks) or max(ranks) > settings.max_lora_rank:
        return False
    return not (isinstance(base_cfg, dict) and base_cfg.get("auto_map") and not settings.trust_remote_code)


def validate_adapter(adapter: FetchedAdapter, base: FetchedBase, settings: Settings) -> ValidationReport:
    """Refuse adapters that cannot be merged safely or served, before touching any weights.

    Checks: peft_type is LORA; weights are safetensors (pickles are refused, never loaded);
    the adapter's base name/revision match where known and its tensor shapes always match the
    base; every target module exists in the base; the rank fits vLLM and ``max_lora_rank``;
    every tensor is finite. DoRA, ``modules_to_save`` and resized embeddings are reported as not
    servable by vLLM runtime LoRA (merging them is still allowed).
    """
    root = adapter.path
    cfg_path = root / "adapter_config.json"
    cfg = _read_config(root)
    base_cfg = _check_base_config(base, settings)
    notes: list[str] = []

    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; loraline releases LoRA adapters only (peft_type \"LORA\")")

    weights = root / "adapter_model.safetensors"
    if not weights.is_file():
        if (root / "adapter_model.bin").is_file():
            raise InvalidAdapter(
                f"{root / 'adapter_model.bin'}: pickled weights are refused and were not loaded; convert them to safetensors "
                "(load the adapter in a trusted environment and model.save_pretrained(dir, safe_serialization=True)) and pass that directory"
            )
        raise InvalidAdapter(f"{weights}: missing; the adapter has no weights — pass the directory that holds adapter_model.safetensors")

    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidAdapter(f"{cfg_path}: rank r={r!r} is not a positive integer; re-save the adapter with PEFT")
    ranks = [r] + [v for v in (cfg.get("rank_pattern") or {}).values() if isinstance(v, int)]
    top = max(ranks)
    if top > VLLM_MAX_LORA_RANKS[-1]:
        raise InvalidAdapter(f"{cfg_path}: rank {top} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest rank vLLM serves; retrain with a smaller r")
    if top > settings.max_lora_rank:
        raise InvalidAdapter(
            f"{cfg_path}: rank {top} is above max_lora_rank={settings.max_lora_rank}; raise LORALINE_MAX_LORA_RANK to "
            f"{min(v for v in VLLM_MAX_LORA_RANKS if v >= top)} (vLLM then reserves memory for that rank) or retrain with r <= {settings.max_lora_rank}"
        )
    serving_rank = min(v for v in VLLM_MAX_LORA_RANKS if v >= top)

    tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((d / f).is_file() for d in (root, base.path) for f in tok_files):
        raise InvalidAdapter(
            f"{root} and base {base.path}: no tokenizer (tokenizer.json / tokenizer_config.json); the served model needs one — "
            "save the fine-tune's tokenizer next to the adapter (tokenizer.save_pretrained(checkpoint_dir))"
        )
    if not any(_has_chat_template(d) for d in (root, base.path)):
        notes_chat = "no chat template in the adapter or the base: /v1/chat/completions will not work; /v1/completions will"
    else:
        notes_chat = ""

    _check_names(cfg, base, cfg_path)
    base_shapes = base_weight_shapes(base.path)
    tied = bool(base_cfg.get("tie_word_embeddings", False))
    modules = set(base_shapes) | ({"lm_head"} if tied else set())
    targets = _match_targets(cfg.get("target_modules"), modules, cfg_path)

    shapes = read_safetensors_shapes([weights])
    if not shapes:
        raise InvalidAdapter(f"{weights}: holds no tensors; re-save the adapter")
    adapted: set[str] = set()
    n_params = 0
    full_tensors: list[str] = []
    for key, shape in shapes.items():
        n_params += _numel(shape)
        m = _LORA_KEY.match(key)
        if not m:
            full_tensors.append(key)
            continue
        module, part = m["module"], m["part"]
        bshape = _base_shape(module, base_shapes, tied)
        if bshape is None:
            raise InvalidAdapter(
                f"{weights}: tensor {key} adapts {module}, which does not exist in the base; "
                "the adapter was trained for another architecture: release it onto the base it was trained on"
            )
        adapted.add(module)
        expected = _expected_shape(part, bshape, shape)
        if expected is not None and tuple(shape) != expected:
            raise InvalidAdapter(
                f"{weights}: tensor {key} has shape {list(shape)} but the base's {module} needs {list(expected)} "
                f"(base weight {list(bshape)}); this adapter was trained for a different base — pass the base it was trained on"
            )

    _check_finite(weights)

    use_dora = bool(cfg.get("use_dora"))
    to_save = tuple(cfg.get("modules_to_save") or ())
    if use_dora:
        notes.append("DoRA (use_dora=true): vLLM runtime LoRA does not serve DoRA; serve the merged model")
    if to_save:
        notes.append(f"modules_to_save={list(to_save)}: vLLM runtime LoRA cannot load full modules; serve the merged model")
    if full_tensors:
        resized = [k for k in full_tensors if "embed_tokens" in k or "lm_head" in k]
        what = "resized embeddings" if resized else "full (non-LoRA) tensors"
        notes.append(f"{what} in the adapter ({', '.join(sorted(full_tensors)[:4])}): vLLM runtime LoRA cannot load them; serve the merged model")
    warnings = [notes_chat] if notes_chat else []
    if cfg.get("bias", "none") != "none":
        notes.append(f"bias={cfg.get('bias')!r}: vLLM runtime LoRA ignores trained biases; serve the merged model")

    return ValidationReport(
        peft_type="LORA",
        r=r,
        lora_alpha=float(cfg.get("lora_alpha", r)),
        target_modules=targets,
        adapted_modules=len(adapted),
        lora_parameters=n_params,
        base_model_name=cfg.get("base_model_name_or_path"),
        use_dora=use_dora,
        modules_to_save=to_save,
        runtime_lora_servable=not notes,
        serving_max_lora_rank=serving_rank,
        notes=tuple(notes + warnings),
    )


def _has_chat_template(d: Path) -> bool:
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    cfg = d / "tokenizer_config.json"
    try:
        return cfg.is_file() and bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
    except ValueError:
        return False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _expected_shape(part: str, base: tuple[int, ...], got: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(base) != 2 or len(got) < 1:
        return None
    out_f, in_f = base
    rank = got[0] if part in ("lora_A", "lora_embedding_A") else got[-1]
    if part == "lora_A":
        return (rank, in_f)
    if part == "lora_B":
        return (out_f, rank)
    if part == "lora_embedding_A":  # embedding weight is [vocab, dim]
        return (rank, out_f)
    if part == "lora_embedding_B":
        return (in_f, rank)
    if part == "lora_magnitude_vector":
        return (out_f,)
    return None


def _check_finite(weights: Path) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as st:
        for key in st.keys():
            t = st.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise InvalidAdapter(
                    f"{weights}: tensor {key} has {bad} NaN/Inf value(s); the training run diverged — "
                    "use an earlier checkpoint or retrain with a lower learning rate"
                )
