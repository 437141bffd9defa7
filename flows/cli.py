"""The ``loraline`` console script: the library's commands plus those that run Prefect flows."""

from __future__ import annotations

import click

from loraline.cli import cli, emit, load_settings, quiet_third_parties, run


@cli.command()
@click.option("--adapter", required=True, envvar="LORALINE_ADAPTER", help="Adapter source: dir, hf://ORG/NAME@REV, runs:/, models:/, mlflow-artifacts:/, s3://BUCKET/PREFIX (LORALINE_S3_*)")
@click.option("--base", required=True, envvar="LORALINE_BASE", help="Base model source: dir, hf://ORG/NAME@REV, s3://BUCKET/PREFIX, or a .gguf file, local or s3:// (converted once, cached under LORALINE_HOME/bases)")
@click.option("--name", required=True, envvar="LORALINE_MODEL_NAME", help="MLflow registered model name")
@click.option("--image", "image", type=click.Choice(["merged", "lora", "gguf", "none"]), default=None,
              help="Serving image to build, push and smoke-test: merged weights, base + adapter layers served as "
                   "runtime LoRA (vLLM), or gguf: a GGUF export (needs --gguf) served by llama.cpp. Default LORALINE_IMAGE, else merged when a Docker engine and a registry are configured "
                   "(`loraline services up`), none otherwise.")
@click.option("--gguf", "gguf", default=None, envvar="LORALINE_GGUF", callback=lambda _c, _p, v: _gguf(v),
              help="GGUF files to export with llama.cpp (converter + quantizer), each checked against the merged model: "
                   "none, auto, or types from f16, q8_0, q4_k_m separated by commas. Default auto: f16,q8_0 when the "
                   "llama.cpp environment (.venv-llama, `make setup`) is there.")
@click.option("--submit", is_flag=True,
              help="Run the release on the Prefect work pool (`loraline services up --production`, or PREFECT_API_URL "
                   "of a server with loraline's deployments) instead of in this process: creates a flow run of "
                   "release/release, follows it, and adds flow_run {id, name, worker, state} to the JSON. Sources must "
                   "be readable where the workers run (shared paths, hf://, s3://, MLflow URIs).")
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Run the flow even when this adapter and base are already released as NAME with nothing left to do "
                   "(by default such a re-run answers the release from MLflow, marked \"cached\": true, without a flow run).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the release's lineage).")
@click.option("-v", "--verbose", is_flag=True, help="Show Prefect's and the libraries' logs on stderr.")
def release(adapter: str, base: str, name: str, image: str | None, gguf: str | None, submit: bool, no_cache: bool, as_json: bool,
            verbose: bool) -> None:
    """Release an adapter: fetch, validate, merge, parity-check, register, benchmark it, then build, push and
    smoke-test its serving image (a Prefect flow).

    A re-run of a release that is done (same adapter and base digests, same NAME, nothing asked for missing) answers
    from MLflow in seconds, marked "cached": true; --no-cache runs the flow anyway.

    The benchmark takes minutes on a CPU (LORALINE_BENCH=false skips it; `loraline bench` runs it later)."""
    settings = load_settings()
    quiet_third_parties(settings, verbose)
    _check_gguf_image(image, gguf, settings)
    if submit:
        emit(_submit(adapter, base, name, image, settings, gguf), as_json)
        return
    if not no_cache:
        from loraline.resume import cached_release

        # Before Prefect is imported or its API started: most of a re-run's time (README "Measured").
        if (cached := cached_release(adapter, base, name, settings, image, gguf)) is not None:
            click.echo(f"loraline release: {cached['model_uri']} already holds this adapter and base with nothing left to "
                       "do: answered from MLflow, no flow run (cached; --no-cache runs the flow)", err=True)
            emit(cached, as_json)
            return
    from loraline_flows.release import release as release_flow
    from loraline_flows.common import start_prefect_api

    start_prefect_api(settings)

    result = release_flow(adapter=adapter, base=base, name=name, image=image, gguf=gguf)
    emit(result, as_json)


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the release's lineage with the benchmark summary).")
@click.option("-v", "--verbose", is_flag=True, help="Show Prefect's and the libraries' logs on stderr.")
def bench(model: str, as_json: bool, verbose: bool) -> None:
    """Benchmark a released MODEL (models:/NAME/VERSION, models:/NAME@ALIAS, or any ref `trace` takes) again: HF vs vLLM offline and
    OpenAI server, merged vs runtime LoRA; numbers, plots and the recommendation go to its MLflow run.

    The workload comes from LORALINE_BENCH_* (input/output length, prompts, repeats, concurrency levels)."""
    settings = load_settings()
    quiet_third_parties(settings, verbose)
    from loraline_flows.benchmark import benchmark as benchmark_flow
    from loraline_flows.common import start_prefect_api

    start_prefect_api(settings)

    result = benchmark_flow(model=model)
    emit(result, as_json)


@cli.command("image")
@click.argument("model")
@click.option("--mode", type=click.Choice(["merged", "lora", "gguf"]), default="merged", show_default=True,
              help="merged weights baked in, base + adapter layers served as runtime LoRA, or a GGUF export of the "
              "release served by llama.cpp (LORALINE_IMAGE_GGUF_QUANT, default q8_0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the release's lineage with the image).")
@click.option("-v", "--verbose", is_flag=True, help="Show Prefect's and the libraries' logs on stderr.")
def image_cmd(model: str, mode: str, as_json: bool, verbose: bool) -> None:
    """Build, push and smoke-test the serving image of a released MODEL (models:/NAME/VERSION, models:/NAME@ALIAS,
    or any ref `trace` takes), with the Docker engine and registry of `loraline services up` (or LORALINE_DOCKER_HOST,
    LORALINE_IMAGE_REGISTRY, LORALINE_IMAGE_BASE)."""
    settings = load_settings()
    quiet_third_parties(settings, verbose)
    from loraline_flows.image import image as image_flow
    from loraline_flows.common import start_prefect_api

    start_prefect_api(settings)

    result = image_flow(model=model, mode=mode)
    emit(result, as_json)


def _check_gguf_image(image: str | None, gguf: str | None, settings) -> None:  # noqa: ANN001
    """--image gguf without a GGUF export (--gguf none): a usage error naming both, before Prefect starts (the flow
    refuses it too, before anything is fetched)."""
    from loraline.errors import LoralineError
    from loraline.gguf_export import gguf_types
    from loraline.image import check_gguf_image, image_mode

    mode = image_mode(settings.model_copy(update={"image": image}) if image else settings)
    if mode != "gguf":
        return
    try:
        check_gguf_image(mode, gguf_types(settings, gguf), settings, gguf)
    except LoralineError as e:
        raise click.UsageError(str(e)) from None


def _gguf(value: str | None) -> str | None:
    """--gguf in its normal form, or a usage error naming the bad part (before anything runs)."""
    from loraline.settings import parse_gguf

    if value is None:
        return None
    try:
        return parse_gguf(value)
    except ValueError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


def _submit(adapter: str, base: str, name: str, image: str | None, settings, gguf: str | None = None) -> dict:  # noqa: ANN001
    import os
    from pathlib import Path

    from loraline_flows.submit import submit_release

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise click.ClickException("--submit needs a Prefect server with loraline's deployments and a work pool: "
                                   "`loraline services up --production`, or set PREFECT_API_URL")
    # Local sources travel as absolute paths: the workers do not start in this directory.
    params = {"adapter": str(Path(adapter).resolve()) if Path(adapter).exists() else adapter,
              "base": str(Path(base).resolve()) if Path(base).exists() else base, "name": name}
    image = image or (settings.image if settings.image != "auto" else None)  # --image, else LORALINE_IMAGE if set
    if image is not None:
        params["image"] = image
    if gguf is not None:
        params["gguf"] = gguf
    return submit_release(params, settings, api)


def main() -> None:
    run(cli)


if __name__ == "__main__":
    main()
