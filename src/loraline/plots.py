"""PNG pictures of a :class:`~loraline.benchmark.BenchReport` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from loraline.benchmark import BenchReport

COLORS = {"merged": "#1f77b4", "lora": "#ff7f0e"}


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _server_rows(report: BenchReport, mode: str) -> list:  # type: ignore[type-arg]
    """The OpenAI-server results of one mode, by concurrency."""
    return sorted((r for r in report.results if r.engine == "vllm-server" and r.mode == mode), key=lambda r: r.concurrency or 0)


def _save(fig, out: Path, name: str) -> Path:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _levels_axis(ax, levels) -> None:  # type: ignore[no-untyped-def]
    """Log-2 x axis labelled with the measured levels themselves (1, 8, 32, 128), not powers of two."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(levels))
    ax.set_xticklabels([str(c) for c in levels])
    ax.minorticks_off()


def throughput_by_path(report: BenchReport, out: Path) -> Path:
    """Output tokens/s per path (server: its highest concurrency), with the repeats' spread."""
    top = max(report.workload.concurrency)
    rows = [r for r in report.results if r.concurrency in (None, top)]
    labels = [r.path + (f"\n(c={r.concurrency})" if r.concurrency is not None else "") for r in rows]
    vals = [r.output_tok_s for r in rows]
    lo = [r.output_tok_s - min(r.output_tok_s_repeats) for r in rows]
    hi = [max(r.output_tok_s_repeats) - r.output_tok_s for r in rows]
    fig, ax = _plt().subplots(figsize=(9, 4.5))
    bars = ax.bar(labels, vals, yerr=[lo, hi], capsize=4, color=[COLORS.get(r.mode, "grey") for r in rows])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], padding=3, fontsize=8)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=COLORS["merged"], label="merged weights"),
                       Patch(color=COLORS["lora"], label="base + LoRA (peft / runtime LoRA)")], fontsize=8)
    ax.set_ylabel("output tokens/s (median, min–max bars)")
    ax.set_title(f"Throughput by path — {report.device_name}, {report.workload.input_len} in / "
                 f"{report.workload.output_len} out")
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, out, "throughput.png")


def latency_percentiles(report: BenchReport, out: Path) -> Path:
    """TTFT, TPOT and ITL p50/p90/p99 of the server paths at each concurrency."""
    fig, axes = _plt().subplots(1, 3, figsize=(13, 4.2))
    for ax, metric, title in zip(axes, ("ttft_ms", "tpot_ms", "itl_ms"), ("TTFT", "TPOT", "ITL")):
        for mode in ("merged", "lora"):
            rows = _server_rows(report, mode)
            if not rows:
                continue
            xs = [r.concurrency for r in rows]
            for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                ys = [getattr(getattr(r, metric), q) for r in rows]
                ax.plot(xs, ys, style, marker="o", color=COLORS[mode], label=f"{mode} {q}")
        _levels_axis(ax, report.workload.concurrency)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} (OpenAI server, streaming)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, out, "latency.png")


def concurrency_curve(report: BenchReport, out: Path) -> Path:
    """Server throughput against concurrency, merged vs runtime LoRA (and vLLM's harness, where it ran)."""
    fig, ax = _plt().subplots(figsize=(7, 4.5))
    for mode in ("merged", "lora"):
        rows = _server_rows(report, mode)
        if rows:
            ax.plot([r.concurrency for r in rows], [r.output_tok_s for r in rows], marker="o", color=COLORS[mode],
                    label=f"loraline, {mode}")
    levels = report.crosscheck.get("levels") or {}
    if levels:
        xs = sorted(int(c) for c in levels)
        ax.plot(xs, [levels[str(c)]["vllm"]["output_tok_s"] for c in xs], "x--", color="black",
                label="vllm bench serve, merged")
    _levels_axis(ax, report.workload.concurrency)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Concurrency curve (vLLM OpenAI server)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out, "concurrency.png")


CPU_ENGINES = ("vllm-server", "llama.cpp-server")


def cpu_engines(report: BenchReport, out: Path) -> Path:
    """vLLM-CPU vs llama.cpp on each GGUF file: out tok/s, TTFT p50 and TPOT p50 by concurrency; peak RSS and ready s."""
    rows = [r for r in report.results if r.engine in CPU_ENGINES and r.mode == "merged"]
    paths = sorted({r.path for r in rows}, key=lambda p: (not p.startswith("vllm"), p))
    cmap = _plt().get_cmap("tab10")
    color = {p: cmap(i) for i, p in enumerate(paths)}
    label = {p: next(f"{'vLLM-CPU' if r.engine == 'vllm-server' else 'llama.cpp'} {r.quant or ''}".strip()
                     for r in rows if r.path == p) for p in paths}
    levels = sorted({r.concurrency for r in rows if r.concurrency is not None})
    fig, axes = _plt().subplots(1, 4, figsize=(17, 4.2))
    for ax, metric, title in zip(axes[:3], ("output_tok_s", "ttft_ms", "tpot_ms"),
                                 ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)")):
        for p in paths:
            pr = sorted((r for r in rows if r.path == p), key=lambda r: r.concurrency or 0)
            ys = [r.output_tok_s if metric == "output_tok_s" else getattr(getattr(r, metric), "p50", 0.0) for r in pr]
            ax.plot([r.concurrency for r in pr], ys, marker="o", color=color[p], label=label[p])
        _levels_axis(ax, levels)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[3]
    first = {p: next(r for r in rows if r.path == p) for p in paths}
    mib = [(first[p].peak_rss_bytes or 0) / 2**20 for p in paths]
    bars = ax.bar([label[p] for p in paths], mib, color=[color[p] for p in paths])
    ax.bar_label(bars, labels=[f"{m:,.0f} MiB\nready {first[p].engine_start_s or 0:.1f} s" for m, p in zip(mib, paths)],
                 fontsize=7, padding=2)
    ax.set_ylim(0, max(mib + [1.0]) * 1.25)  # room for the labels
    ax.set_title("peak RSS (server process group)")
    ax.set_ylabel("MiB")
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    cpu = getattr(report, "cpu", None)
    fig.suptitle("CPU serving, same prompts: vLLM-CPU vs llama.cpp (one request at a time)"
                 + (f" — recommended: {cpu.engine} {cpu.quant}" if cpu else ""), fontsize=10)
    return _save(fig, out, "cpu_engines.png")


def write_plots(report: BenchReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [throughput_by_path(report, out)]
    if any(r.engine == "vllm-server" for r in report.results):
        paths += [latency_percentiles(report, out), concurrency_curve(report, out)]
    if any(r.engine == "llama.cpp-server" for r in report.results):
        paths.append(cpu_engines(report, out))
    return paths
