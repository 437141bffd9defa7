"""GGUF export: the merged model as llama.cpp files (f16, q8_0, q4_k_m), each checked against the merged model.

The other direction from :mod:`loraline.gguf_base` (which reads a GGUF *base* into transformers). Here llama.cpp's own
tools make the files, in the llama.cpp environment (:mod:`loraline.llama_engine`, the seam):

- ``f16``: ``convert_hf_to_gguf.py MERGED --outtype f16`` (the sdist's vendored converter). bf16 weights fit f16
  exactly unless they are beyond f16's range (65504), so this file is the merged model as llama.cpp runs it;
- ``q8_0``, ``q4_k_m``: llama.cpp's quantizer (``llama_model_quantize``) from that f16 file.

Each file then generates greedily with llama.cpp (the binding, logprobs) on the release's parity prompts, from the
same token ids as the merged model in transformers, judged with the rule of every other parity check
(:func:`loraline.parity.judge`: identical, or at the first divergence each side's token is in the other's top-k).
``f16`` must pass as vLLM must (:func:`loraline.parity.require_parity`); a quantized file's verdict
(identical / close / failed) is recorded and left to the gate (``GateThresholds.max_gguf_quant_failed``).

When the release ran its task evaluation (``merged_accuracy`` given), each file also answers the same Text-to-SQL
questions (:func:`loraline.evaluate.eval_questions`: prompts rendered with the merged model's chat template and
tokenized here, as :func:`loraline.evaluate.generate_answers` does; greedy, ``eval_max_new_tokens``, stopping at EOS;
decoded with the same tokenizer) and is scored the same way (:func:`loraline.evaluate.score`): its execution accuracy
is recorded beside the merged model's, and the gate limits the drop (``GateThresholds.max_gguf_accuracy_drop``).

Files are kept by the merged model's digest (``<home>/gguf/<merged sha256>/model-<type>.gguf``): a re-run with the same
merged model and the same llama.cpp reuses them (the converter is deterministic: same input, same bytes).

Public API::

    gguf_types(settings, value=None) -> tuple[str, ...]
    gguf_required(settings, value=None) -> bool
    export_gguf(merged_dir, merged_sha256, types, settings, progress=None, merged_accuracy=None) -> GgufExport
    gguf_accuracy(engine, gguf_file, tokenizer, questions, db, settings) -> EvalScore
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from loraline.digest import sha256_file
from loraline.errors import EngineError, SettingsError
from loraline.evaluate import EvalScore, eval_questions, score
from loraline.llama_engine import CONVERTER_REFUSED, LlamaEngine, convert_to_gguf, find_llama, generate_gguf, llama_available, quantize_gguf
from loraline.parity import Generation, ParityReport, encode_prompts, hf_generations, parity_prompts, report, require_parity
from loraline.settings import GGUF_AUTO, Settings, parse_gguf

RECORD = "export.json"  # beside the files: what made them (checked before reusing them)
SCHEMA = "loraline.gguf-export/v1"


def verdict(p: ParityReport) -> str:
    """A GGUF file's parity in one word: identical (every prompt), close (none failed), or failed."""
    return "identical" if p.identical == p.prompts else "close" if p.failed == 0 else "failed"


@dataclass(frozen=True)
class GgufFile:
    """One exported file: its type, where it is, its digest and size, what made it, its parity and its task accuracy."""

    quant: str
    path: Path
    sha256: str
    bytes: int
    made_by: str  # the converter or quantizer call that wrote it
    seconds: float  # what making it took (0 when an earlier export's file was reused)
    parity: ParityReport
    accuracy: EvalScore | None = None  # the task evaluation on this file; None when the release ran none
    merged_accuracy: float | None = None  # the merged model's accuracy on the same questions (transformers)

    @property
    def verdict(self) -> str:
        """identical (every prompt), close (none failed), or failed."""
        return verdict(self.parity)

    def summary(self) -> dict[str, Any]:
        p, a = self.parity, self.accuracy
        accuracy = None
        if a is not None:
            m = self.merged_accuracy
            accuracy = {"accuracy": round(a.accuracy, 4), "examples": a.examples, "correct": a.correct, "valid_sql": a.valid,
                        "merged_accuracy": None if m is None else round(m, 4),
                        "drop": None if m is None else round(m - a.accuracy, 4), "seconds": round(a.seconds, 2)}
        return {"quant": self.quant, "file": self.path.name, "sha256": self.sha256, "bytes": self.bytes,
                "made_by": self.made_by, "seconds": round(self.seconds, 2),
                "parity": {"verdict": self.verdict, "identical": p.identical, "close": p.close, "failed": p.failed,
                           "prompts": p.prompts, "max_abs_logprob_diff": round(p.max_abs_logprob_diff, 4),
                           "first_divergences": [r.first_divergence for r in p.results], "seconds": round(p.seconds, 2)},
                "accuracy": accuracy}


@dataclass(frozen=True)
class GgufExport:
    merged_sha256: str
    directory: Path
    files: tuple[GgufFile, ...]
    converter: dict[str, str | None]  # llama_cpp_python, llama_cpp_commit, gguf, converter_sha256
    seconds: float
    skipped: str | None = None  # why nothing was exported (``skip_unsupported``: the converter refused the model)

    def summary(self) -> list[dict[str, Any]]:
        return [{**f.summary(), "converter": self.converter} for f in self.files]


def gguf_types(settings: Settings, value: str | None = None) -> tuple[str, ...]:
    """The GGUF types a release exports: ``value`` (``--gguf``) else ``settings.gguf``; ``auto`` is
    :data:`~loraline.settings.GGUF_AUTO` when the llama.cpp environment is there, none otherwise. A bad value is a
    :class:`SettingsError` naming it and the choices (raised before anything is fetched or merged)."""
    try:
        v = parse_gguf(value if value is not None else settings.gguf)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    if v == "none":
        return ()
    if v == "auto":
        return GGUF_AUTO if llama_available(settings) else ()
    return tuple(v.split(","))


def gguf_required(settings: Settings, value: str | None = None) -> bool:
    """Whether the GGUF types were asked for by name (``--gguf`` / LORALINE_GGUF other than ``auto``): then a model
    llama.cpp cannot convert fails the step instead of being skipped, and a skip recorded before is tried again."""
    try:
        return parse_gguf(value if value is not None else settings.gguf) != "auto"
    except ValueError as e:
        raise SettingsError(str(e)) from None


def _reusable(directory: Path, engine: LlamaEngine, quant: str) -> dict[str, Any] | None:
    """The record of ``model-<quant>.gguf`` an earlier export left, when the same llama.cpp made it and it is intact."""
    try:
        rec = json.loads((directory / RECORD).read_text())["files"][quant]
    except (OSError, ValueError, KeyError):
        return None
    f = directory / rec["file"]
    if rec.get("converter") != engine.versions() or not f.is_file() or f.stat().st_size != rec["bytes"]:
        return None
    return rec


def _record(directory: Path, quant: str, rec: dict[str, Any]) -> None:
    path = directory / RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"schema": SCHEMA, "files": {}}
    data["files"][quant] = rec
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _make(engine: LlamaEngine, merged_dir: Path, directory: Path, quant: str, settings: Settings,
          say: Callable[[str], None]) -> tuple[Path, str, str, float]:
    """``model-<quant>.gguf`` (made now, or an earlier export's): (path, sha256, made_by, seconds)."""
    out = directory / f"model-{quant}.gguf"
    rec = _reusable(directory, engine, quant)
    if rec is not None:
        say(f"{out.name}: kept from an earlier export (sha256 {rec['sha256'][:12]})")
        return out, rec["sha256"], rec["made_by"], 0.0
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")  # two releases of one merged model never share one
    tmp.unlink(missing_ok=True)
    if quant == "f16":
        seconds = convert_to_gguf(engine, merged_dir, tmp, settings, outtype="f16")
        made_by = f"convert_hf_to_gguf.py --outtype f16 (llama-cpp-python {engine.llama_cpp_python} sdist)"
    else:
        f16, _, _, _ = _make(engine, merged_dir, directory, "f16", settings, say)
        seconds = quantize_gguf(engine, f16, tmp, quant, settings)
        made_by = f"llama_model_quantize({quant.upper()}) of model-f16.gguf (llama-cpp-python {engine.llama_cpp_python})"
    tmp.replace(out)  # complete files only under the final name
    sha = sha256_file(out)
    _record(directory, quant, {"file": out.name, "sha256": sha, "bytes": out.stat().st_size, "made_by": made_by,
                               "converter": engine.versions()})
    say(f"{out.name}: {out.stat().st_size / 1e6:.1f} MB in {seconds:.1f} s (sha256 {sha[:12]})")
    return out, sha, made_by, seconds


def _llama_generations(engine: LlamaEngine, gguf_file: Path, ids: Sequence[Sequence[int]], settings: Settings,
                       n_ctx: int) -> list[Generation]:
    answer = generate_gguf(engine, gguf_file, ids, settings, max_tokens=settings.parity_max_new_tokens,
                           logprobs=settings.parity_top_k, n_ctx=n_ctx)
    return [Generation(tokens=tuple(o["token_ids"]), logprobs=tuple(o["chosen_logprobs"]),
                       top=tuple({int(t): lp for t, lp in step.items()} for step in o["logprobs"]), text=o["text"])
            for o in answer["outputs"]]


def gguf_accuracy(engine: LlamaEngine, gguf_file: Path, tokenizer: Any, questions: list[tuple[str, str]], db: Path,
                  settings: Settings) -> EvalScore:
    """Execution accuracy of ``gguf_file`` on ``questions`` ((question, reference SQL)), answered greedily by llama.cpp
    from the prompts transformers' evaluation builds (``tokenizer``'s chat template, tokenized without added special
    tokens), ``settings.eval_max_new_tokens`` tokens at most, and scored on ``db`` as the merged model is."""
    from loraline.text2sql import render_prompt

    ids = encode_prompts(tokenizer, [render_prompt(tokenizer, q) for q, _ in questions])
    t0 = time.perf_counter()
    answer = generate_gguf(engine, gguf_file, ids, settings, max_tokens=settings.eval_max_new_tokens, logprobs=0,
                           n_ctx=max(len(p) for p in ids) + settings.eval_max_new_tokens + 8, reuse_prefix=True)
    answers = [tokenizer.decode(o["token_ids"], skip_special_tokens=True) for o in answer["outputs"]]
    return score(f"llama.cpp:{Path(gguf_file).name}", questions, answers, db, time.perf_counter() - t0)


def export_gguf(merged_dir: Path, merged_sha256: str, types: Sequence[str], settings: Settings,
                progress: Callable[[str], None] | None = None, skip_unsupported: bool = False,
                merged_accuracy: float | None = None) -> GgufExport:
    """Export the merged model in ``merged_dir`` as GGUF files of ``types`` with llama.cpp, and check each file's
    greedy outputs against the merged model's in transformers (same prompts, same token ids). With
    ``merged_accuracy`` (the release's task evaluation of the merged model ran), each file's task accuracy on the
    same questions is measured too (:func:`gguf_accuracy`) and recorded beside it.

    Raises :class:`~loraline.errors.EngineError` when llama.cpp is missing or cannot convert the model (the message
    says why: e.g. a tokenizer llama.cpp does not know), :class:`~loraline.errors.ParityError` when the f16 file fails
    parity. Quantized files are returned with whatever verdict they got. ``skip_unsupported`` (``--gguf auto``): a model
    llama.cpp's converter refuses gives an export with no files and ``skipped`` saying why, instead of the error.
    """
    from loraline.hf_models import load_tokenizer
    from loraline.text2sql import create_database

    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    engine = find_llama(settings)
    directory = settings.gguf_dir / merged_sha256
    directory.mkdir(parents=True, exist_ok=True)
    try:
        made = {q: _make(engine, Path(merged_dir), directory, q, settings, say) for q in types}
    except EngineError as e:
        if not (skip_unsupported and str(e).startswith(CONVERTER_REFUSED)):
            raise
        reason = str(e).split("\n", 1)[0]
        say(f"skipped: {reason}")
        return GgufExport(merged_sha256=merged_sha256, directory=directory, files=(), converter=engine.versions(),
                          seconds=time.perf_counter() - t0, skipped=reason)

    prompts = parity_prompts(Path(merged_dir), settings)
    tok = load_tokenizer(Path(merged_dir), Path(merged_dir), settings)
    ids = encode_prompts(tok, prompts)
    n_ctx = max(len(p) for p in ids) + settings.parity_max_new_tokens + 8
    kw = dict(top_k=settings.parity_top_k, max_new_tokens=settings.parity_max_new_tokens)
    t1 = time.perf_counter()
    reference = hf_generations(Path(merged_dir), ids, settings)  # the HF parity step's, when this process ran it
    hf_s = time.perf_counter() - t1
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        db = create_database(Path(tmp) / "task.db") if merged_accuracy is not None else None
        for q, (path, sha, made_by, seconds) in made.items():
            t1 = time.perf_counter()
            gens = _llama_generations(engine, path, ids, settings, n_ctx)
            rep = report("hf-merged", f"llama.cpp-{q}", prompts, reference, gens, seconds=hf_s + time.perf_counter() - t1, **kw)
            say(f"{path.name}: parity vs the merged model {rep.identical} identical, {rep.close} close, {rep.failed} "
                f"failed of {rep.prompts} ({verdict(rep)})")
            if q == "f16":
                require_parity(rep)  # llama.cpp on the unquantized file must reproduce the merged model, as vLLM must
            acc = None
            if db is not None:
                acc = gguf_accuracy(engine, path, tok, eval_questions(settings), db, settings)
                say(f"{path.name}: task accuracy {acc.accuracy:.1%} ({acc.correct} of {acc.examples}; the merged model "
                    f"{merged_accuracy:.1%}) in {acc.seconds:.1f} s")
            files.append(GgufFile(quant=q, path=path, sha256=sha, bytes=path.stat().st_size, made_by=made_by,
                                  seconds=seconds, parity=rep, accuracy=acc, merged_accuracy=merged_accuracy))
    return GgufExport(merged_sha256=merged_sha256, directory=directory, files=tuple(files), converter=engine.versions(),
                      seconds=time.perf_counter() - t0)


def exported_file(entry: dict[str, Any], gguf_dir: Path, merged_sha256: str) -> tuple[Path, bool]:
    """Where the export of a lineage ``gguf`` entry lives in this home (``<gguf_dir>/<merged sha256>/<file>``), and
    whether it is there with the recorded size (the benchmark and the llama.cpp image read it from there)."""
    path = Path(gguf_dir) / merged_sha256 / str(entry.get("file") or f"model-{entry['quant']}.gguf")
    return path, path.is_file() and not (entry.get("bytes") and path.stat().st_size != int(entry["bytes"]))


def parity_dict(f: GgufFile) -> dict[str, Any]:
    """The file's whole parity report (every prompt), for ``gguf/parity-<type>.json``."""
    return asdict(f.parity)
