"""The one seam to llama.cpp: subprocesses of the llama.cpp environment's Python (``settings.llama_python``).

Like vLLM (:mod:`loraline.engine`), llama.cpp never runs inside loraline's process: llama-cpp-python is a compiled
sdist with its own pins, built once by ``make setup`` into ``.venv-llama``. Two programs run there:

- llama.cpp's own HF -> GGUF converter, ``convert_hf_to_gguf.py`` (vendored in the llama-cpp-python sdist with the
  ``gguf`` package it is written against): :func:`convert_to_gguf`;
- :mod:`loraline.llama_runner` (run as a file): quantize with llama.cpp's quantizer (``llama_model_quantize``; the
  binding's build makes no ``llama-quantize`` binary), greedy generation with logprobs, and what version is there:
  :func:`quantize_gguf`, :func:`generate_gguf`, :func:`find_llama`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from loraline.engine import engine_env, run_in_group, run_runner_file
from loraline.errors import EngineError
from loraline.settings import LLAMA_VENV, Settings

RUNNER = Path(__file__).with_name("llama_runner.py")
CONVERTER = "convert_hf_to_gguf.py"
_FIX = (f"run `make setup` (it builds {LLAMA_VENV} with llama-cpp-python and llama.cpp's converter, about 3 min once) "
        "or set LORALINE_LLAMA_PYTHON to a Python that has llama-cpp-python, and LORALINE_LLAMA_CPP_DIR to llama.cpp's "
        f"source tree (with {CONVERTER} and gguf-py)")
CONVERTER_REFUSED = "llama.cpp's converter could not convert"  # how :func:`convert_to_gguf`'s refusals begin
# llama.cpp's file types (llama.h ``enum llama_ftype``) for the types loraline quantizes to.
FTYPES = {"q8_0": 7, "q4_k_m": 15}
_found: dict[tuple[str, str], "LlamaEngine"] = {}


@dataclass(frozen=True)
class LlamaEngine:
    """An environment that runs llama.cpp: its Python, the converter, and what versions they are."""

    python: Path
    converter: Path  # convert_hf_to_gguf.py
    llama_cpp_python: str  # the binding's version, e.g. 0.3.36
    llama_cpp_commit: str | None  # the llama.cpp commit the sdist vendors (its CHANGELOG), e.g. 0c1e57098
    gguf: str  # the gguf package the converter runs with (the sdist's gguf-py)
    converter_sha256: str

    def versions(self) -> dict[str, str | None]:
        return {"llama_cpp_python": self.llama_cpp_python, "llama_cpp_commit": self.llama_cpp_commit, "gguf": self.gguf,
                "converter_sha256": self.converter_sha256}


def llama_available(settings: Settings) -> bool:
    """Whether a llama.cpp environment is configured (its Python exists); :func:`find_llama` checks it works."""
    return settings.llama_python is not None and Path(settings.llama_python).expanduser().is_file()


def find_llama(settings: Settings) -> LlamaEngine:
    """The llama.cpp environment of ``settings.llama_python`` (and its converter), checked by importing llama_cpp in it:
    :class:`EngineError` saying how to make one when it is missing or broken. The answer is kept for this process."""
    python = settings.llama_python
    if python is None:
        raise EngineError(f"no llama.cpp environment is configured (LORALINE_LLAMA_PYTHON is not set, and no "
                          f"{LLAMA_VENV}/bin/python was found beside {Path(sys.prefix).absolute()} or in the checkout); {_FIX}")
    python = Path(python).expanduser()
    if not python.is_file() or not os.access(python, os.X_OK):
        raise EngineError(f"LORALINE_LLAMA_PYTHON={python} is not an executable file; {_FIX}")
    tree = Path(settings.llama_cpp_dir).expanduser() if settings.llama_cpp_dir else python.parent.parent / "llama.cpp"
    converter = tree / CONVERTER
    if not converter.is_file():
        raise EngineError(f"llama.cpp's converter {converter} is not there; {_FIX}")
    key = (str(python.absolute()), str(converter.absolute()))
    if key not in _found:
        answer = _run(python, {"mode": "info", "converter": str(converter.absolute())}, settings, f"{python} (import llama_cpp)")
        _found[key] = LlamaEngine(python=python, converter=converter, llama_cpp_python=answer["llama_cpp_python"],
                                  llama_cpp_commit=answer.get("llama_cpp_commit"), gguf=answer["gguf"],
                                  converter_sha256=answer["converter_sha256"])
    return _found[key]


def convert_to_gguf(engine: LlamaEngine, model_dir: Path, out_file: Path, settings: Settings, outtype: str = "f16") -> float:
    """``convert_hf_to_gguf.py MODEL_DIR --outtype OUTTYPE --outfile OUT_FILE`` in the llama.cpp environment; its wall
    seconds. :class:`EngineError` with the converter's last lines when it fails (e.g. a tokenizer it does not know)."""
    cmd = [str(engine.python), str(engine.converter), str(Path(model_dir).resolve()), "--outtype", outtype,
           "--outfile", str(Path(out_file).resolve())]
    env = engine_env(settings, None)
    env.pop("NO_LOCAL_GGUF", None)  # the converter then puts its own gguf-py first on sys.path: what it is written against
    t0 = time.perf_counter()
    rc, out = run_in_group(cmd, env, f"llama.cpp's converter on {model_dir}", settings.engine_timeout_s,
                           log_name="converter output")
    if rc != 0 or not Path(out_file).is_file():
        hint = ""
        if "pre-tokenizer was not recognized" in out:
            hint = (" — llama.cpp does not know this model's tokenizer (its BPE pre-tokenizer hash is not in "
                    "convert_hf_to_gguf.py); export GGUF only for models llama.cpp supports, or pass --gguf none")
        elif "not supported" in out.lower():
            hint = " — llama.cpp does not support this architecture; pass --gguf none"
        raise EngineError(f"{CONVERTER_REFUSED} {model_dir} to GGUF (exit {rc}){hint}\n"
                          f"--- converter output (last lines) ---\n{_tail(out)}")
    return time.perf_counter() - t0


def quantize_gguf(engine: LlamaEngine, in_file: Path, out_file: Path, quant: str, settings: Settings) -> float:
    """Quantize a GGUF file to ``quant`` (:data:`FTYPES`) with llama.cpp's quantizer; its seconds."""
    if quant not in FTYPES:
        raise EngineError(f"llama.cpp quantization to {quant!r} is not wired; use one of {', '.join(FTYPES)}")
    answer = _run(engine.python, {"mode": "quantize", "input": str(Path(in_file).resolve()),
                                  "output": str(Path(out_file).resolve()), "ftype": FTYPES[quant],
                                  "threads": os.cpu_count() or 1}, settings, f"llama.cpp quantize {in_file} -> {quant}")
    return float(answer["seconds"])


def generate_gguf(engine: LlamaEngine, gguf_file: Path, prompts: Sequence[Sequence[int]], settings: Settings, *,
                  max_tokens: int, logprobs: int, n_ctx: int = 2048, threads: int | None = None,
                  reuse_prefix: bool = False) -> dict[str, Any]:
    """Greedy generation from token ids with llama.cpp on ``gguf_file`` (the binding's ``Llama``): the runner's answer
    (``outputs`` in prompt order with token ids, chosen and top-``logprobs`` logprobs, text; ``timings``). Each answer
    stops after an end-of-generation token (kept, as transformers keeps its EOS) or ``max_tokens``. ``logprobs`` 0: no
    top-k. ``reuse_prefix``: the KV cache of what a prompt shares with the one before is kept (prompts that begin
    alike, as the task questions do, are then evaluated mostly once; the logits may differ from a fresh evaluation's in
    the last bits, as the server's prompt cache makes them)."""
    request = {"mode": "generate", "model": str(Path(gguf_file).resolve()), "prompts": [[int(t) for t in p] for p in prompts],
               "max_tokens": int(max_tokens), "logprobs": int(logprobs), "n_ctx": int(n_ctx),
               "threads": threads or free_cores(), "reuse_prefix": bool(reuse_prefix)}
    answer = _run(engine.python, request, settings, f"llama.cpp on {gguf_file}")
    if len(answer["outputs"]) != len(prompts):
        raise EngineError(f"llama.cpp on {gguf_file} answered {len(answer['outputs'])} outputs for {len(prompts)} prompts")
    return answer


def free_cores(window_s: float = 0.5) -> int:
    """Threads for llama.cpp now: every core, or one while other processes keep more than half a core busy (measured
    from ``/proc/stat`` over ``window_s``). ggml's threads wait for each other at every op; beside a busy process a
    2-thread decode stalls: the parity generations of the real demo's f16 file took 94.8 s on 2 threads and 37.3 s on
    one with the machine's load average at 4.3 on 2 cores (:class:`loraline.training.SharedCores` decides the same for
    torch)."""
    cores = os.cpu_count() or 1

    def busy() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

    before = busy()
    time.sleep(window_s)  # this process idles meanwhile: what is counted is the others'
    after = busy()
    if cores == 1 or before is None or after is None:
        return cores
    return 1 if (after - before) / window_s > 0.5 else cores


# What the llama.cpp serving image installs (docker/Dockerfile.gguf): the binding with its OpenAI-compatible server.
SERVER_REQUIREMENT = "llama_cpp_python[server]"


def server_wheels(settings: Settings, out: Path) -> dict[str, Any]:
    """Wheels of llama-cpp-python's server and everything it needs, repacked from the llama.cpp environment into ``out``
    (:func:`loraline.llama_runner.wheels`): the llama.cpp build ``make setup`` compiled, for an offline
    ``pip install --no-index --find-links``. ``{"wheels": [{name, version, file, bytes}], "python": "3.11"}``."""
    engine = find_llama(settings)
    return _run(engine.python, {"mode": "wheels", "roots": [SERVER_REQUIREMENT], "out": str(out)}, settings,
                f"{engine.python} (wheels of {SERVER_REQUIREMENT})")


def _run(python: Path, request: dict[str, Any], settings: Settings, what: str) -> dict[str, Any]:
    """Run :mod:`loraline.llama_runner` on ``request`` with ``python``: its answer, or :class:`EngineError` with the log."""
    answer, _ = run_runner_file(python, RUNNER, request, engine_env(settings, None), what, settings.engine_timeout_s,
                                fix=_FIX, log_name="log")
    return answer


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
