"""The release benchmark: every path of :mod:`loraline.workload`'s protocol, a report, a recommendation.

Paths, in the order they run (one model in memory at a time):

- ``hf-merged`` / ``hf-peft``: Transformers ``generate`` on the merged model and on base + adapter;
- ``vllm-offline-merged`` / ``vllm-offline-lora``: vLLM's offline engine, all prompts at once,
  plus a single stream (TTFT, TPOT);
- ``vllm-server-merged`` / ``vllm-server-lora``: vLLM's OpenAI server, streaming, at each
  concurrency level (:mod:`loraline.loadgen`); on the merged server, vLLM's own ``vllm bench
  serve`` runs the same levels and lengths as a cross-check.

LoRA paths on vLLM are skipped (with a note) when validation found the adapter not servable as
runtime LoRA. The result is a :class:`BenchReport`: per-path numbers, vLLM's memory report, the
cross-check, and which deploy mode (merged or runtime LoRA) the numbers favour.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from loraline.errors import EngineError
from loraline.hf_bench import bench_hf_paths
from loraline.settings import Settings
from loraline.workload import PathResult, Percentiles, Workload, random_prompts

GIB = 1024**3
# Datasheet HBM bandwidth (bytes/s): single-stream decode floor = weight bytes / this.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # H100: SXM (HBM3); the PCIe part has 2.0 TB/s
# Two harnesses agree when within this fraction (issue 3: 10%).
AGREEMENT = 0.10
# Runtime LoRA is recommended when it keeps this share of merged throughput at every server level.
LORA_KEEPS = 0.90
# The CPU deployment recommendation (:func:`recommend_cpu`): throughput at this concurrency decides, and servers within
# CPU_TIE of the best count as tied, the one with the smaller peak RSS winning.
CPU_LEVEL = 8
CPU_TIE = 0.05
CPU_ENGINES = {"vllm-server": "vLLM-CPU", "llama.cpp-server": "llama.cpp"}


@dataclass(frozen=True)
class CpuRecommendation:
    """Which engine and weights to deploy on CPU, from the server numbers (:func:`recommend_cpu`)."""

    engine: str  # "vLLM-CPU" | "llama.cpp"
    quant: str  # the weights: "bf16" (vLLM on the merged safetensors) or the GGUF type
    path: str  # the benchmark path it comes from, e.g. "llama.cpp-server-q8_0"
    concurrency: int  # the level compared
    reason: str
    candidates: dict[str, dict[str, Any]]  # path -> out tok/s at the level, peak RSS, parity, eligible

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recommendation:
    mode: str  # "merged" | "lora"
    reason: str
    lora_vs_merged: dict[str, float]  # throughput ratio per compared level/path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchReport:
    workload: Workload
    device: str  # "cpu" | "cuda"
    device_name: str
    vllm_version: str
    results: tuple[PathResult, ...]
    engines: dict[str, dict[str, Any]]  # per engine start: start seconds, vLLM's memory report, config
    crosscheck: dict[str, Any]
    recommendation: Recommendation
    floor: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    cpu: CpuRecommendation | None = None  # when llama.cpp ran beside vLLM-CPU (a CPU release with GGUF files)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = "loraline.benchmark/v1"
        return d

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: ``bench.<path>[.c<N>].<metric>``."""
        m: dict[str, float] = {"bench.seconds": self.seconds}
        for r in self.results:
            key = f"bench.{r.path}" + (f".c{r.concurrency}" if r.concurrency is not None else "")
            m[f"{key}.output_tok_s"] = r.output_tok_s
            m[f"{key}.requests_s"] = r.requests_s
            for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
                p: Percentiles | None = getattr(r, name)
                if p is not None:
                    m.update({f"{key}.{name}.p50": p.p50, f"{key}.{name}.p90": p.p90, f"{key}.{name}.p99": p.p99})
            if r.peak_memory_bytes is not None:
                m[f"{key}.peak_memory_bytes"] = float(r.peak_memory_bytes)
            if r.peak_rss_bytes is not None:
                m[f"{key}.peak_rss_bytes"] = float(r.peak_rss_bytes)
            if r.engine_start_s is not None:
                m[f"{key}.engine_start_s"] = r.engine_start_s
        for level, c in (self.crosscheck.get("levels") or {}).items():
            for k in ("output_tok_s_ratio", "ttft_p50_ratio", "tpot_p50_ratio"):
                if c.get(k) is not None:
                    m[f"bench.crosscheck.c{level}.{k}"] = c[k]
        for path, f in self.floor.items():
            if isinstance(f, dict) and "percent_of_floor" in f:
                m[f"bench.{path}.percent_of_bandwidth_floor"] = f["percent_of_floor"]
        return m

    def markdown(self) -> str:
        """The table users read (Prefect artifact, MLflow artifact, README)."""
        w = self.workload
        lines = [
            f"### Benchmark: {self.device_name or self.device}, vLLM {self.vllm_version}",
            "",
            f"Workload: {w.input_len} tokens in, {w.output_len} out (random token ids, greedy, ignore_eos); "
            f"{w.prompts} prompts per offline repeat, server levels {list(w.concurrency)}; {w.repeats} timed repeats, "
            "fresh prompts each; medians, spread in brackets.",
            "",
            "| path | conc. | requests | out tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | peak memory | start s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.results:
            reps = r.output_tok_s_repeats
            spread = f" [{min(reps):,.0f}–{max(reps):,.0f}]" if len(reps) > 1 else ""
            lines.append(
                f"| {r.path} | {r.concurrency if r.concurrency is not None else 'all'} | {r.requests} | "
                f"{r.output_tok_s:,.0f}{spread} | {r.requests_s:.2f} | {_pp(r.ttft_ms)} | {_pp(r.tpot_ms, 2)} | "
                f"{_pp(r.itl_ms, 2)} | {_gib(r.peak_memory_bytes)} | "
                f"{'' if r.engine_start_s is None else f'{r.engine_start_s:.1f}'} |"
            )
        rec = self.recommendation
        lines += ["", f"**Recommended deploy mode: {rec.mode}.** {rec.reason}"]
        if self.cpu is not None:
            lines += ["", self.cpu_markdown()]
        levels = self.crosscheck.get("levels") or {}
        if levels:
            lines += ["", "Cross-check against vLLM's own `vllm bench serve` (merged server, same lengths and levels; "
                      "loraline / vLLM):", "",
                      "| conc. | out tok/s | TTFT p50 ms | TPOT p50 ms | within 10% |", "| --- | --- | --- | --- | --- |"]
            for level, c in levels.items():
                lines.append(
                    f"| {level} | {c['loraline']['output_tok_s']:,.0f} / {c['vllm']['output_tok_s']:,.0f} | "
                    f"{c['loraline']['ttft_p50_ms']:.1f} / {c['vllm']['ttft_p50_ms']:.1f} | "
                    f"{c['loraline']['tpot_p50_ms']:.2f} / {c['vllm']['tpot_p50_ms']:.2f} | "
                    f"{'yes' if c['within'] else 'no'} |"
                )
        elif self.crosscheck.get("skipped"):
            lines += ["", f"Cross-check skipped: {self.crosscheck['skipped']}"]
        for path, f in self.floor.items():
            if isinstance(f, dict) and "percent_of_floor" in f:
                lines.append(f"\nSingle-stream decode on {path}: {f['measured_tpot_ms']:.2f} ms/token, "
                             f"{f['percent_of_floor']:.0f}% of the memory-bandwidth floor ({f['floor_ms_per_token']:.2f} ms).")
        lines += [f"\n- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


    def cpu_markdown(self) -> str:
        """The CPU comparison: vLLM-CPU's server and llama.cpp's on each GGUF file, same prompts, and the pick."""
        rows = sorted((r for r in self.results if r.engine in CPU_ENGINES and r.mode == "merged"),
                      key=lambda r: (r.concurrency or 0, r.engine != "vllm-server", r.path))
        out = ["#### CPU serving: vLLM-CPU vs llama.cpp (llama-cpp-python's server), same prompts", "",
               "| engine | weights | conc. | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | "
               "peak RSS | ready s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            out.append(f"| {CPU_ENGINES[r.engine]} | {r.quant or ''} | {r.concurrency} | {r.output_tok_s:,.1f} | "
                       f"{_pp(r.ttft_ms)} | {_pp(r.tpot_ms, 2)} | {_pp(r.itl_ms, 2)} | {_mib(r.peak_rss_bytes)} | "
                       f"{'' if r.engine_start_s is None else f'{r.engine_start_s:.1f}'} |")
        c = self.cpu
        assert c is not None
        out += ["", f"**CPU deployment: {c.engine}, {c.quant}.** {c.reason}", "",
                "Peak RSS: the largest summed VmRSS of the server's process group, sampled every 0.25 s. ready s: from "
                "spawning the server to its first 200 (vLLM /health, llama.cpp /v1/models). llama-cpp-python serves one "
                "request at a time: at concurrency > 1 its requests queue."]
        return "\n".join(out)


def _mib(n: int | None) -> str:
    return "–" if not n else f"{n / 2**20:,.0f} MiB"


def _pp(p: Percentiles | None, digits: int = 1) -> str:
    return "–" if p is None else f"{p.p50:.{digits}f} / {p.p99:.{digits}f}"


def _gib(n: int | None) -> str:
    return "–" if not n else f"{n / GIB:.2f} GiB"


# --------------------------------------------------------------------------- vLLM offline


def vllm_memory_bytes(facts: dict[str, dict[str, float]]) -> int | None:
    """vLLM's own report: weights loaded + KV cache reserved (+ CUDA graphs), bytes.

    On CUDA: "Model loading took X GiB", "Available KV cache memory: Y GiB", graphs; on CPU:
    "Checkpoint size: X GiB" and the KV cache it "explicitly set" (VLLM_CPU_KVCACHE_SPACE).
    """
    weights = facts.get("model_loading", {}).get("gib", facts.get("checkpoint", {}).get("gib"))
    kv = facts.get("kv_cache_memory", {}).get("gib", facts.get("cpu_kv_cache", {}).get("gib"))
    parts = [weights, kv, facts.get("cuda_graphs", {}).get("gib")]
    known = [p for p in parts if p is not None]
    return int(sum(known) * GIB) if known else None


def offline_result(response: dict[str, Any], path: str, mode: str, workload: Workload) -> PathResult:
    """A :class:`PathResult` from :func:`loraline.engine.run_bench`'s answer (one workload + single stream)."""
    (w,) = response["workloads"]
    reps = w["repeats"]
    tput = [r["output_tok_s"] for r in reps]
    ss = response.get("single_stream") or {}
    pct = lambda k: Percentiles.of(ss[k]) if ss.get(k) else None  # noqa: E731
    return PathResult(
        path=path,
        engine="vllm",
        mode=mode,
        requests=w["requests"],
        output_tokens=w["requests"] * w["output_len"],
        output_tok_s=statistics.median(tput),
        output_tok_s_repeats=tuple(tput),
        requests_s=statistics.median(r["requests_s"] for r in reps),
        ttft_ms=pct("ttft_ms"),
        tpot_ms=pct("tpot_ms"),
        itl_ms=None,  # the offline engine returns whole outputs
        e2e_ms=pct("e2e_ms"),
        peak_memory_bytes=vllm_memory_bytes(response.get("log_facts") or {}),
        engine_start_s=response["timings"]["engine_start_s"],
        notes=("TTFT/TPOT/e2e from single-stream requests; throughput from all prompts at once",),
    )


def bench_vllm_offline(model_dir: Path, settings: Settings, workload: Workload, vocab: int, path: str, mode: str,
                       lora: tuple[str, Path, int] | None) -> tuple[PathResult, dict[str, Any]]:
    from loraline.engine import run_bench

    seed = workload.seed + (500 if lora else 400) * 1000
    w = workload
    wl = {
        "name": str(w.prompts),
        "output_len": w.output_len,
        "warmup_prompts": random_prompts(vocab, w.prompts, w.input_len, seed=seed),
        "prompt_sets": [random_prompts(vocab, w.prompts, w.input_len, seed=seed + r + 1) for r in range(w.repeats)],
    }
    single = {
        "output_len": w.output_len,
        "prompts": random_prompts(vocab, 2 * w.single_stream_pairs, w.input_len, seed=seed + 900),
        "warmup_prompts": random_prompts(vocab, 1, w.input_len, seed=seed + 950),
    }
    r = run_bench(model_dir, settings, workloads=[wl], single_stream=single, lora=lora)
    info = {"engine_start_s": r["timings"]["engine_start_s"], "vllm_memory_report": r.get("log_facts"),
            "device_memory_after_start": r.get("memory"), "config": r.get("config"), "vllm_version": r["vllm_version"],
            "device": r.get("device")}
    return offline_result(r, path, mode, workload), info


# --------------------------------------------------------------------------- vLLM server


def server_results(levels: dict[int, list[Any]], path: str, mode: str, workload: Workload, *, start_s: float,
                   memory: int | None, engine: str = "vllm-server", rss: int | None = None, quant: str | None = None,
                   notes: Sequence[str] = ("streaming /v1/completions; engine_start_s = server process start to /health 200",),
                   ) -> list[PathResult]:
    """One :class:`PathResult` per concurrency level from its timed :class:`~loraline.loadgen.LevelResult` repeats."""
    out = []
    for c, reps in levels.items():
        recs = [x for rep in reps for x in rep.records]
        tput = [rep.output_tokens / rep.elapsed_s for rep in reps]
        out.append(PathResult(
            path=path,
            engine=engine,
            mode=mode,
            requests=len(reps[0].records),
            output_tokens=reps[0].output_tokens,
            output_tok_s=statistics.median(tput),
            output_tok_s_repeats=tuple(tput),
            requests_s=statistics.median(len(rep.records) / rep.elapsed_s for rep in reps),
            ttft_ms=Percentiles.of([x.ttft_s * 1e3 for x in recs]),
            tpot_ms=Percentiles.of([x.tpot_s * 1e3 for x in recs if x.tpot_s is not None]),
            itl_ms=Percentiles.of([g * 1e3 for x in recs for g in x.itl_s]),
            e2e_ms=Percentiles.of([x.e2e_s * 1e3 for x in recs]),
            peak_memory_bytes=memory,
            engine_start_s=start_s,
            concurrency=c,
            notes=tuple(notes),
            peak_rss_bytes=rss,
            quant=quant,
        ))
    return out


def load_server(url: str, model: str, workload: Workload, vocab: int, seed: int, timeout_s: float,
                progress: Callable[[str], None], *, prompts: Callable[[int, int], list[Any]] | None = None,
                api: str = "vllm", no_eos_ids: Sequence[int] = (), levels_to_run: Sequence[int] | None = None,
                ) -> dict[int, list[Any]]:
    """Every concurrency level: one untimed warm-up round, then ``repeats`` timed ones, fresh prompts each.

    ``prompts(n, seed)``: the prompts to send (default: :func:`random_prompts` token ids); a level's seeds depend on its
    place in ``workload.concurrency`` only, so two servers given the same ``seed`` and ``prompts`` get the same prompts
    at a level even when one runs only some of the levels (``levels_to_run``). ``api``/``no_eos_ids``: see
    :func:`loraline.loadgen.run_level`."""
    from loraline.loadgen import run_level

    make = prompts or (lambda n, s: random_prompts(vocab, n, workload.input_len, seed=s))
    what = "llama.cpp server" if api == "llama.cpp" else "vLLM server"
    kw = dict(timeout_s=timeout_s, api=api, no_eos_ids=tuple(no_eos_ids))
    levels: dict[int, list[Any]] = {}
    for i, c in enumerate(workload.concurrency):
        if levels_to_run is not None and c not in levels_to_run:
            continue
        n = workload.server_requests(c)
        s = seed + 10_000 * (i + 1)
        run_level(url, model, make(c, s), workload.output_len, c, **kw)  # type: ignore[arg-type]
        reps = []
        for r in range(workload.repeats):
            rep = run_level(url, model, make(n, s + r + 1), workload.output_len, c, **kw)  # type: ignore[arg-type]
            bad = rep.failed or [x for x in rep.records if x.output_tokens != workload.output_len]
            if bad:
                raise EngineError(f"the {what} at {url} answered {len(bad)} of {n} requests at concurrency {c} badly "
                                  f"(first: {bad[0].error or f'{bad[0].output_tokens} tokens, not {workload.output_len}'})")
            reps.append(rep)
        levels[c] = reps
        tput = statistics.median(rep.output_tokens / rep.elapsed_s for rep in reps)
        progress(f"  concurrency {c}: {n} requests x {workload.repeats}, {tput:,.0f} out tok/s")
    return levels


def crosscheck_argv(url: str, served: str, tokenizer_dir: Path, workload: Workload, concurrency: int, seed: int) -> list[str]:
    """``vllm bench serve`` flags for the same lengths, request count and concurrency as loraline's level."""
    return [
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", served, "--tokenizer", str(tokenizer_dir),
        "--dataset-name", "random", "--random-input-len", str(workload.input_len),
        "--random-output-len", str(workload.output_len), "--num-prompts", str(workload.server_requests(concurrency)),
        "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
        "--num-warmups", str(concurrency), "--disable-tqdm", "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
    ]  # fmt: skip


def compare(ours: PathResult, theirs: dict[str, Any]) -> dict[str, Any]:
    """loraline's numbers at one level next to vLLM's harness's; ratios are loraline / vLLM."""
    a = {"output_tok_s": ours.output_tok_s, "ttft_p50_ms": ours.ttft_ms.p50 if ours.ttft_ms else 0.0,
         "tpot_p50_ms": ours.tpot_ms.p50 if ours.tpot_ms else 0.0, "itl_p50_ms": ours.itl_ms.p50 if ours.itl_ms else 0.0}
    b = {"output_tok_s": float(theirs["output_throughput"]), "ttft_p50_ms": float(theirs["p50_ttft_ms"]),
         "tpot_p50_ms": float(theirs["p50_tpot_ms"]), "itl_p50_ms": float(theirs["p50_itl_ms"]),
         "completed": theirs.get("completed"), "failed": theirs.get("failed"),
         "total_output_tokens": theirs.get("total_output_tokens")}
    ratios = {
        "output_tok_s_ratio": a["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else None,
        "ttft_p50_ratio": a["ttft_p50_ms"] / b["ttft_p50_ms"] if b["ttft_p50_ms"] else None,
        "tpot_p50_ratio": a["tpot_p50_ms"] / b["tpot_p50_ms"] if b["tpot_p50_ms"] else None,
    }
    within = all(r is not None and abs(r - 1) <= AGREEMENT for r in ratios.values())
    return {"loraline": a, "vllm": b, **ratios, "within": within}


# --------------------------------------------------------------------------- recommendation


def recommend(results: Sequence[PathResult]) -> Recommendation:
    """Merged unless runtime LoRA keeps ``LORA_KEEPS`` of merged throughput on every vLLM level measured.

    Runtime LoRA ships a small adapter layer on a shared base (many adapters, one server); merged
    pays nothing per token. When LoRA stays within 10% everywhere, its flexibility wins.
    """
    ratios: dict[str, float] = {}
    for r in results:
        if r.engine == "transformers" or r.mode != "lora":
            continue
        twin = next((m for m in results if m.engine == r.engine and m.mode == "merged" and m.concurrency == r.concurrency
                     and m.path.replace("merged", "lora") == r.path), None)
        if twin and twin.output_tok_s > 0:
            ratios[f"{r.path}" + (f"@c{r.concurrency}" if r.concurrency is not None else "")] = r.output_tok_s / twin.output_tok_s
    if not ratios:
        return Recommendation("merged", "runtime LoRA was not measured on vLLM (not servable as runtime LoRA, or no engine); "
                                        "merged is the only mode with numbers.", {})
    worst_key = min(ratios, key=lambda k: ratios[k])
    worst = ratios[worst_key]
    if worst >= LORA_KEEPS:
        return Recommendation("lora", f"runtime LoRA keeps at least {worst:.0%} of merged throughput everywhere "
                                      f"(lowest: {worst_key}); it ships as a small adapter layer on a shared base.", ratios)
    return Recommendation("merged", f"runtime LoRA reaches only {worst:.0%} of merged throughput at {worst_key}; "
                                    f"merged weights cost nothing per token.", ratios)


def recommend_cpu(results: Sequence[PathResult], verdicts: dict[str, str]) -> CpuRecommendation | None:
    """The CPU deployment (engine + weights) the server numbers favour, or None when llama.cpp did not run.

    The rule: the candidates are vLLM-CPU's server on the merged model, and llama.cpp's on each GGUF file whose parity
    verdict against the merged model is not ``failed`` (``verdicts``: quant -> verdict). They are compared at
    concurrency :data:`CPU_LEVEL` (8: a small team's service), or, when not every candidate ran it, at the largest level
    below it that all ran (else the smallest they share). The highest output tok/s wins; any within :data:`CPU_TIE`
    (5%) of it count as tied, and of those the smallest peak RSS wins (the machine's memory is what a CPU host runs
    out of first).
    """
    rows = [r for r in results if r.engine in CPU_ENGINES and r.mode == "merged" and r.concurrency is not None]
    if not any(r.engine == "llama.cpp-server" for r in rows):
        return None
    paths = sorted({r.path for r in rows})
    eligible = {p for p in paths if not p.startswith("llama.cpp-server-")
                or verdicts.get(p.removeprefix("llama.cpp-server-")) != "failed"}
    shared = set.intersection(*({r.concurrency for r in rows if r.path == p} for p in (eligible or paths)))
    shared = shared or {min(r.concurrency for r in rows)}  # type: ignore[type-var]
    below = [c for c in shared if c <= CPU_LEVEL]
    level = max(below) if below else min(shared)
    at = {r.path: r for r in rows if r.concurrency == level}
    candidates = {p: {"engine": CPU_ENGINES[at[p].engine], "quant": at[p].quant, "output_tok_s": round(at[p].output_tok_s, 2),
                      "peak_rss_bytes": at[p].peak_rss_bytes, "ready_s": at[p].engine_start_s,
                      "parity": verdicts.get(p.removeprefix("llama.cpp-server-")) if p.startswith("llama.cpp") else "passed",
                      "eligible": p in eligible} for p in paths if p in at}
    pool = [p for p in candidates if candidates[p]["eligible"]]
    if not pool:
        return CpuRecommendation("vLLM-CPU", "none", "", level, "every GGUF file failed parity and vLLM-CPU was not "
                                 "measured: no CPU deployment can be recommended from these numbers", candidates)
    best = max(pool, key=lambda p: candidates[p]["output_tok_s"])
    top = candidates[best]["output_tok_s"]
    tied = [p for p in pool if candidates[p]["output_tok_s"] >= (1 - CPU_TIE) * top]
    pick = min(tied, key=lambda p: (candidates[p]["peak_rss_bytes"] or float("inf"), -candidates[p]["output_tok_s"]))
    ch = candidates[pick]
    why = f"{ch['output_tok_s']:,.1f} out tok/s at concurrency {level}"
    if pick != best:
        why += (f", within {CPU_TIE:.0%} of the fastest ({best}: {top:,.1f}) with less memory "
                f"({_mib(ch['peak_rss_bytes'])} vs {_mib(candidates[best]['peak_rss_bytes'])})")
    elif len(tied) > 1:
        why += f", the fastest; those within {CPU_TIE:.0%} of it ({', '.join(sorted(set(tied) - {pick}))}) use more memory"
    else:
        runner = max((p for p in pool if p != pick), key=lambda p: candidates[p]["output_tok_s"], default=None)
        why += (f", the fastest (next: {runner}, {candidates[runner]['output_tok_s']:,.1f})" if runner else ", the only candidate")
    excluded = sorted(p for p in candidates if not candidates[p]["eligible"])
    if excluded:
        why += f"; not considered (parity failed): {', '.join(excluded)}"
    why += f"; peak RSS {_mib(ch['peak_rss_bytes'])}, ready in {ch['ready_s']:.1f} s" if ch["ready_s"] is not None else ""
    return CpuRecommendation(ch["engine"], str(ch["quant"]), pick, level, why + ".", candidates)


def bandwidth_floor(device_name: str, merged_dir: Path, base_dir: Path, lora_params: int,
                    results: Sequence[PathResult]) -> dict[str, Any]:
    """Single-stream decode vs weight bytes / HBM bandwidth (GPU only; datasheet bandwidth)."""
    bw = next((v for k, v in HBM_BANDWIDTH.items() if k in device_name), None)
    if bw is None:
        return {"bandwidth_assumed": f"no datasheet bandwidth for {device_name or 'this device'}: floor not computed"}
    out: dict[str, Any] = {"bandwidth_assumed": f"{bw / 1e12:.2f} TB/s (datasheet, {device_name})"}
    weights = {"vllm-offline-merged": _weight_bytes(merged_dir), "vllm-offline-lora": _weight_bytes(base_dir) + 2 * lora_params}
    for path, wbytes in weights.items():
        r = next((x for x in results if x.path == path), None)
        floor_ms = wbytes / bw * 1e3
        entry = {"weight_bytes": wbytes, "floor_ms_per_token": floor_ms}
        if r is not None and r.tpot_ms is not None and r.tpot_ms.p50 > 0:
            entry.update(measured_tpot_ms=r.tpot_ms.p50, percent_of_floor=100.0 * floor_ms / r.tpot_ms.p50)
        out[path] = entry
    return out


def _weight_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


# --------------------------------------------------------------------------- all paths


def release_dirs(lineage: dict[str, Any], settings: Settings, base_dir: Path | None = None) -> tuple[Path, Path, Path]:
    """``(adapter, base, merged)`` directories of a release, from its lineage, checked to be there.

    Without ``base_dir`` the base is fetched again from where the release took it, and refused if
    its digest changed since.
    """
    from loraline.sources import fetch_base

    ref = f"models:/{lineage['model_name']}/{lineage['model_version']}"
    adapter_dir, merged_dir = Path(lineage["adapter"]["path"]), Path(lineage["merged"]["path"])
    for d, what in ((merged_dir, "merged model"), (adapter_dir, "adapter")):
        if not d.is_dir():
            raise EngineError(f"the {what} of {ref} is gone from {d}; re-run `loraline release` to rebuild it")
    if base_dir is None:
        base = fetch_base(lineage["base"]["resolved"] or lineage["base"]["source"], settings)
        if base.sha256 != lineage["base"]["sha256"]:
            raise EngineError(f"base {lineage['base']['source']} of {ref} changed since the release (sha256 "
                              f"{base.sha256[:12]}, released {lineage['base']['sha256'][:12]}); release it again instead")
        base_dir = base.path
    return adapter_dir, Path(base_dir), merged_dir


def run_benchmark(adapter_dir: Path, base_dir: Path, merged_dir: Path, settings: Settings, *,
                  workload: Workload | None = None, runtime_lora: bool = True, served_name: str = "model",
                  lora_params: int = 0, progress: Callable[[str], None] = lambda _msg: None,
                  gguf: Sequence[Any] = (), gguf_notes: Sequence[str] = ()) -> BenchReport:
    """Run every path on one workload and return the report (nothing is logged here).

    ``gguf``: the release's GGUF files (:class:`loraline.llama_bench.GgufTarget`). On a CPU engine each is served by
    llama.cpp beside vLLM-CPU's merged server, with the same prompts (:mod:`loraline.llama_bench`), and the report gets
    a CPU deployment recommendation (:func:`recommend_cpu`)."""
    from transformers import AutoConfig

    from loraline.engine import find_engine, vllm_lora_rank
    from loraline.server import serve_openai

    t_all = time.perf_counter()
    w = workload or Workload.from_settings(settings)
    vocab = int(AutoConfig.from_pretrained(merged_dir, trust_remote_code=False).vocab_size)
    notes: list[str] = list(gguf_notes)
    engines: dict[str, dict[str, Any]] = {}

    progress(f"HF generate: merged and peft, {w.prompts} prompts x {w.repeats} repeats")
    results: list[PathResult] = list(bench_hf_paths(adapter_dir, base_dir, merged_dir, settings, w))

    engine = find_engine(settings)
    lora = ("bench-lora", adapter_dir, vllm_lora_rank(adapter_dir)) if runtime_lora else None
    if not runtime_lora:
        notes.append("vLLM runtime-LoRA paths skipped: validation found the adapter not servable as runtime LoRA")
    device_name = ""
    for mode in ("merged", "lora"):
        if mode == "lora" and lora is None:
            continue
        path = f"vllm-offline-{mode}"
        progress(f"{path}: engine start, {w.prompts} prompts at once x {w.repeats}, {w.single_stream_pairs} single-stream pairs")
        model = merged_dir if mode == "merged" else base_dir
        res, info = bench_vllm_offline(model, settings, w, vocab, path, mode, lora if mode == "lora" else None)
        results.append(res)
        engines[path] = info
        device_name = device_name or str((info.get("device_memory_after_start") or {}).get("device_name") or "")

    llama_cpp = bool(gguf) and engine.device == "cpu"
    if gguf and not llama_cpp:
        notes.append(f"llama.cpp paths skipped: they are measured beside vLLM-CPU only (this engine is {engine.device})")
    text_prompts_of = _text_prompts(merged_dir, w) if llama_cpp else None
    if text_prompts_of is not None:
        notes.append("server prompts: random whole-word token ids whose text tokenizes back to the same ids (vLLM gets "
                     "the ids, llama.cpp the text: the same prompts)")
    server_seed = w.seed + 100_000  # the merged server's prompts; llama.cpp's servers get the same ones
    crosscheck: dict[str, Any] = {}
    for mode in ("merged", "lora"):
        if mode == "lora" and lora is None:
            continue
        path = f"vllm-server-{mode}"
        name = served_name if mode == "merged" else f"{served_name}-lora"
        model = merged_dir if mode == "merged" else base_dir
        progress(f"{path}: server start, concurrency {list(w.concurrency)}")
        kwargs: dict[str, Any] = {}
        if mode == "lora":
            kwargs = {"lora_modules": {name: adapter_dir}, "max_lora_rank": lora[2]}  # type: ignore[index]
        ids_of = ((lambda n, s, f=text_prompts_of[0]: [p.ids for p in f(n, s)])  # type: ignore[index]
                  if text_prompts_of is not None and mode == "merged" else None)
        with serve_openai(model, settings, served_model_name=served_name, **kwargs) as server:
            levels = load_server(server.url, name, w, vocab, w.seed + (2 if mode == "lora" else 1) * 100_000,
                                 settings.engine_timeout_s, progress, prompts=ids_of)
            if mode == "merged" and settings.bench_crosscheck:
                progress("vllm bench serve (cross-check) on the merged server")
                crosscheck = run_crosscheck(server.url, served_name, merged_dir, w, settings)
            log = server.log_path.read_text(encoding="utf-8", errors="replace")
        from loraline.engine import engine_log_facts

        facts = engine_log_facts(log)
        memory = server.memory_report()
        engines[path] = {"engine_start_s": server.ready_s, "vllm_memory_report": facts, "memory": memory,
                         "log": str(server.log_path)}
        results += server_results(levels, path, mode, w, start_s=server.ready_s, memory=vllm_memory_bytes(facts),
                                  rss=memory.get("peak_rss_bytes") or None,
                                  quant=_dtype_of(model) if mode == "merged" else None)

    cpu = None
    if text_prompts_of is not None:
        from loraline.llama_bench import bench_llama_servers

        make, no_eos = text_prompts_of
        llama_results, llama_engines = bench_llama_servers(gguf, settings, w, prompts=make, no_eos_ids=no_eos,
                                                           seed=server_seed, served_name=served_name, progress=progress)
        results += llama_results
        engines.update(llama_engines)
        cpu = recommend_cpu(results, {t.quant: t.verdict for t in gguf})

    if crosscheck.get("levels"):
        for level, c in crosscheck["levels"].items():
            ours = next(r for r in results if r.path == "vllm-server-merged" and r.concurrency == int(level))
            crosscheck["levels"][level] = compare(ours, c)
    elif not settings.bench_crosscheck:
        crosscheck = {"skipped": "LORALINE_BENCH_CROSSCHECK=false"}

    vllm_version = next((e.get("vllm_version") for e in engines.values() if e.get("vllm_version")), engine.vllm_version)
    floor = bandwidth_floor(device_name, merged_dir, base_dir, lora_params, results) if engine.device == "cuda" else {}
    return BenchReport(
        workload=w,
        device=engine.device,
        device_name=device_name or engine.device,
        vllm_version=vllm_version,
        results=tuple(results),
        engines=engines,
        crosscheck=crosscheck,
        recommendation=recommend(results),
        floor=floor,
        notes=tuple(notes),
        seconds=round(time.perf_counter() - t_all, 1),
        cpu=cpu,
    )


def _text_prompts(merged_dir: Path, w: Workload) -> tuple[Callable[[int, int], list[Any]], list[int]]:
    """``(prompts(n, seed) -> TextPrompt list, special token ids)`` from the merged model's tokenizer."""
    from transformers import AutoTokenizer

    from loraline.workload import special_ids, text_prompts, word_tokens

    tok = AutoTokenizer.from_pretrained(merged_dir)
    pool = word_tokens(tok)
    return (lambda n, seed: text_prompts(tok, n, w.input_len, seed=seed, words=pool)), special_ids(tok)


def _dtype_of(model_dir: Path) -> str:
    from loraline.llama_bench import model_dtype

    return model_dtype(model_dir)


def run_crosscheck(url: str, served: str, tokenizer_dir: Path, w: Workload, settings: Settings) -> dict[str, Any]:
    """vLLM's ``vllm bench serve`` at each level against the running server: ``{"levels": {c: its result}}``."""
    from loraline.engine import run_serve_bench

    runs = [{"name": str(c), "argv": crosscheck_argv(url, served, tokenizer_dir, w, c, w.seed + 7 + c)} for c in w.concurrency]
    r = run_serve_bench(runs, settings)
    levels = {}
    for run in r["runs"]:
        res = run["result"]
        if res.get("failed"):
            raise EngineError(f"vllm bench serve at concurrency {run['name']}: {res['failed']} requests failed")
        levels[run["name"]] = res
    return {"harness": f"vllm bench serve (vllm.benchmarks.serve, vLLM {r['vllm_version']})", "levels": levels}


def bench_cpu_servers(merged_dir: Path, gguf: Sequence[Any], settings: Settings, workload: Workload, *,
                      vllm: bool = True, served_name: str = "model", threads: int | None = None,
                      progress: Callable[[str], None] = lambda _msg: None,
                      ) -> tuple[list[PathResult], dict[str, dict[str, Any]], CpuRecommendation | None]:
    """The CPU serving comparison alone (``benchmarks/llama_vs_vllm.py``, tests): vLLM-CPU's OpenAI server on the merged
    model (unless ``vllm=False``), then llama.cpp's on each GGUF file (:class:`loraline.llama_bench.GgufTarget`), all
    with the same prompts; the results, what each engine reported, and :func:`recommend_cpu`'s pick."""
    from loraline.llama_bench import bench_llama_servers
    from loraline.server import serve_openai

    make, no_eos = _text_prompts(merged_dir, workload)
    seed = workload.seed + 100_000
    results: list[PathResult] = []
    engines: dict[str, dict[str, Any]] = {}
    if vllm:
        progress(f"vllm-server-merged: server start, concurrency {list(workload.concurrency)}")
        with serve_openai(merged_dir, settings, served_model_name=served_name) as server:
            levels = load_server(server.url, served_name, workload, 0, seed, settings.engine_timeout_s, progress,
                                 prompts=lambda n, s: [p.ids for p in make(n, s)])
        memory = server.memory_report()
        engines["vllm-server-merged"] = {"engine_start_s": server.ready_s, "memory": memory, "log": str(server.log_path)}
        results += server_results(levels, "vllm-server-merged", "merged", workload, start_s=server.ready_s, memory=None,
                                  rss=memory.get("peak_rss_bytes") or None, quant=_dtype_of(merged_dir))
    llama_results, llama_engines = bench_llama_servers(gguf, settings, workload, prompts=make, no_eos_ids=no_eos, seed=seed,
                                                       threads=threads, served_name=served_name, progress=progress)
    results += llama_results
    engines.update(llama_engines)
    return results, engines, recommend_cpu(results, {t.quant: t.verdict for t in gguf})
