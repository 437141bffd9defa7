"""Typed flow parameters: what a user fills in the Prefect UI's run form (defaults + descriptions).

Prefect renders a pydantic model parameter as a nested form with each field's description and
default; the same models are accepted from the CLI and the API as plain dicts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraline.settings import Settings

ImageMode = Literal["merged", "lora", "gguf", "none"]


class BenchmarkWorkload(BaseModel):
    """The release benchmark's workload: HF generate vs vLLM (offline and OpenAI server), merged vs runtime LoRA."""

    model_config = ConfigDict(extra="forbid", title="Benchmark workload")

    run: bool = Field(default=True, description="Benchmark the release (minutes on a CPU; off: `loraline bench` runs it later).")
    input_len: int = Field(default=128, ge=1, description="Prompt length, tokens (random token ids).")
    output_len: int = Field(default=128, ge=2, description="Output length, tokens (exactly this many: ignore_eos).")
    prompts: int = Field(default=32, ge=1, description="Prompts per timed repeat on the HF and vLLM offline paths.")
    repeats: int = Field(default=3, ge=1, description="Timed repeats per path and concurrency level.")
    concurrency: list[int] = Field(default=[1, 8, 32, 128], description="OpenAI-server concurrency levels (streaming requests in flight).")
    crosscheck: bool = Field(default=True, description="Also run vLLM's own `vllm bench serve` on the merged server as a cross-check.")

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if not v or any(c < 1 for c in v):
            raise ValueError(f"benchmark concurrency {v} must list levels >= 1, e.g. [1, 8, 32, 128]")
        return sorted(set(v))

    @classmethod
    def from_settings(cls, settings: Settings) -> "BenchmarkWorkload":
        """The workload the settings (LORALINE_BENCH_*) describe: the form's defaults."""
        return cls(run=settings.bench, input_len=settings.bench_input_len, output_len=settings.bench_output_len,
                   prompts=settings.bench_prompts, repeats=settings.bench_repeats,
                   concurrency=list(settings.bench_concurrency), crosscheck=settings.bench_crosscheck)

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with this workload in place of LORALINE_BENCH_*."""
        return settings.model_copy(update={
            "bench": self.run, "bench_input_len": self.input_len, "bench_output_len": self.output_len,
            "bench_prompts": self.prompts, "bench_repeats": self.repeats, "bench_concurrency": list(self.concurrency),
            "bench_crosscheck": self.crosscheck})


class GateThresholds(BaseModel):
    """What a release must show before the gate moves the registry aliases (``candidate``, then ``champion``).

    A release that misses one is kept, tagged ``loraline.gate=failed`` with the reasons, and no alias moves."""

    model_config = ConfigDict(extra="forbid", title="Gate thresholds")

    min_parity_identical: float = Field(
        default=0.5, ge=0, le=1,
        description="Share of parity prompts whose greedy output from the merged model is identical to base + adapter (peft).")
    min_accuracy: float = Field(
        default=0.0, ge=0, le=1, description="Least Text-to-SQL execution accuracy of the merged model (the task evaluation).")
    min_accuracy_gain: float | None = Field(
        default=None, ge=-1, le=1,
        description="Least accuracy gain of the merged model over the base (0: no worse than the base); empty: no limit.")
    require_vllm_parity: bool = Field(
        default=False, description="vLLM's outputs (merged and runtime LoRA) must have been checked against peft and passed.")
    require_benchmark: bool = Field(default=False, description="The release must have been benchmarked.")
    min_output_tok_s: float | None = Field(
        default=None, ge=0,
        description="Least output tokens/s of the merged model on vLLM's OpenAI server (best concurrency level); empty: no limit.")
    require_image: bool = Field(
        default=False, description="A serving image must have been pushed and have passed its smoke test.")
    max_gguf_quant_failed: float | None = Field(
        default=None, ge=0, le=1,
        description="Largest share of parity prompts a quantized GGUF export (q8_0, q4_k_m) may fail against the merged "
                    "model (logprobs-close rule; f16 must always pass); empty: reported in the gate, not limited.")
    # 0.05 by default: llama.cpp's arithmetic differs from transformers' even at f16, and over 64 greedy tokens that
    # flips an answer now and then (the real demo's f16 file answered 1 of 50 questions differently from the merged
    # model: 70% vs 68%); five points leave room for two such flips of 50 and refuse a quantized file that really
    # loses the task (a user who asked for q4_k_m expects to hear when it does, not to find out in production).
    max_gguf_accuracy_drop: float | None = Field(
        default=0.05, ge=0, le=1,
        description="Largest drop in task accuracy (absolute: 0.05 = 5 points) a GGUF export (f16 included) may show "
                    "below the merged model's on the same questions; empty: reported in the gate, not limited. Checked "
                    "only when the release ran its task evaluation (LORALINE_EVAL).")
    champion_tolerance: float | None = Field(
        default=0.0, ge=0, le=1,
        description="Champion–challenger: the release's task accuracy may be at most this much below the current "
                    "`champion`'s (0: no worse than the champion; 0.05: up to 5 points worse); empty: no comparison. "
                    "Passes when there is no champion yet or the champion is this version.")
    promote: bool = Field(
        default=True, description="Move `champion` to a release that passes (off: only `candidate` moves).")
