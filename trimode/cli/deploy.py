"""`trimode deploy`: quantize -> build -> repo in one command (trimode/deploy.py), then optionally
serve and ask each mode once."""

from __future__ import annotations

import time
from pathlib import Path

import click

from trimode.cli.common import MODES, CalibrationBar, ModeList, echo_json, resolve_checkpoint_dir
from trimode.cli.engine import ProgramBar, engine_options
from trimode.cli.serve import check_ports, serving, wait_until_stopped

DEFAULT_PROMPT = "def __init__(self, name, value=None):"


@click.command()
@click.argument("checkpoint_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="The deploy folder: quantized/, engine/, repo/ and manifest.json go in it.",
)
@click.option(
    "--fp8/--no-fp8",
    default=True,
    show_default=True,
    help="Quantize to FP8 first (skipped for an input that is already FP8).",
)
@click.option(
    "--calib-samples", type=click.IntRange(1, 1 << 20), default=64, show_default=True, help="FP8 calibration windows."
)
@click.option(
    "--calib-seq-len",
    type=click.IntRange(2, 1 << 20),
    default=256,
    show_default=True,
    help="Tokens per calibration window.",
)
@engine_options
@click.option("--prefix", default="", help="Prepended to every model name in the repository.")
@click.option("--modes", type=ModeList(), default=",".join(MODES), show_default=True, help="One ensemble per mode.")
@click.option(
    "--serve",
    "serve_after",
    is_flag=True,
    help="Then start tritonserver, send one request per mode, print each answer, and serve until Ctrl-C.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    default=None,
    help="The engine model's torch threads in the repository (`trimode repo --threads`) [default: 1].",
)
@click.option("--once", is_flag=True, help="With --serve: stop the server after the requests (CI, make demo).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="With --serve: the request's text.")
@click.option(
    "--max-tokens",
    type=click.IntRange(1, 1 << 20),
    default=48,
    show_default=True,
    help="With --serve: tokens per answer.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="With --serve: the address to listen on.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--force", is_flag=True, help="Redo every stage, even one whose input and settings are unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the deploy manifest (and the answers) as JSON.")
def deploy(
    checkpoint_dir: Path | None,
    out_dir: Path,
    fp8: bool,
    calib_samples: int,
    calib_seq_len: int,
    backend: str,
    max_batch_size: int,
    max_seq_len: int,
    max_input_len: int,
    block_lengths: tuple[int, ...] | None,
    kv_block_size: int,
    kv_cache_memory: str | None,
    device: str,
    prefix: str,
    modes: tuple[str, ...],
    threads: int | None,
    serve_after: bool,
    once: bool,
    prompt: str,
    max_tokens: int,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    force: bool,
    as_json: bool,
) -> None:
    """Quantize CHECKPOINT_DIR (default: the embedded checkpoint) to FP8, build an engine, and write
    a Triton model repository for it, each stage's output under OUT with its manifest.

    A re-run into the same OUT reuses every stage whose input and settings are unchanged and redoes
    the rest, so it is cheap to run from CI. With --serve, it then starts the server, asks every
    mode's ensemble once and prints each answer with its tokens per forward pass and tokens/s.
    """
    from trimode.builder import BuildSettings
    from trimode.deploy import FOLDERS, DeploySettings, Hooks
    from trimode.deploy import deploy as run_deploy
    from trimode.passes import Mode
    from trimode.quantize import QuantizeSettings
    from trimode.triton_repo.server import Ports, check_host
    from trimode.triton_repo.settings import RepoSettings

    if once and not serve_after:
        raise click.UsageError("--once goes with --serve")
    ports = Ports(http_port, grpc_port, metrics_port)
    if serve_after:
        check_host(host)  # before the stages, not after
        check_ports(ports)
    settings = DeploySettings(
        fp8=fp8,
        quantize=QuantizeSettings(calib_samples=calib_samples, calib_seq_len=calib_seq_len),
        build=BuildSettings(
            backend=backend,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            max_input_len=max_input_len,
            block_lengths=block_lengths or (),
            device=device.split(":")[0],
            kv_block_size=kv_block_size,
            kv_cache_memory=kv_cache_memory,
        ),
        repo=RepoSettings(prefix=prefix, modes=tuple(Mode(m) for m in modes), threads=threads or 0),
    )
    calibration_bar, program_bar = CalibrationBar(calib_samples, as_json), ProgramBar(backend, as_json)

    def on_stage(stage: str, status: str) -> None:
        calibration_bar.close()  # a finished calibration's bar, before the next stage's lines
        if not as_json:
            click.echo(
                f"{stage:<9}{status}" + ("" if status == "skipped" else f" -> {out_dir / FOLDERS[stage]}"), err=True
            )

    hooks = Hooks(on_stage, calibration_bar.update, program_bar.start, program_bar.update)
    try:
        manifest = run_deploy(resolve_checkpoint_dir(checkpoint_dir), out_dir, settings, force, hooks)
    finally:
        calibration_bar.close()
        program_bar.close()
    answers = []
    if serve_after:
        log = out_dir / "tritonserver.log"
        with serving(out_dir / FOLDERS["repo"], host, ports, log) as server:
            click.echo(f"tritonserver's log: {log}", err=True)
            answers = [ask(server.endpoints["grpc"], mode, prefix, prompt, max_tokens, as_json) for mode in modes]
            if as_json:
                echo_json({**manifest, "answers": answers})
            if not once:
                click.echo("serving until Ctrl-C", err=True)
                wait_until_stopped(server)
        return
    if as_json:
        echo_json(manifest)
    else:
        click.echo(f"deployed {out_dir}: serve it with `trimode serve {out_dir / FOLDERS['repo']}`")


def ask(url: str, mode: str, prefix: str, prompt: str, max_tokens: int, quiet: bool) -> dict:
    """One request to the mode's ensemble at temperature 0; prints the answer and its rates."""
    from trimode.triton_repo import client

    model = client.model_name(mode, prefix)
    start = time.perf_counter()
    result = client.infer(url, model, {"text_input": prompt, "max_tokens": max_tokens, "temperature": 0.0})
    seconds = time.perf_counter() - start
    answer = {
        "mode": mode,
        "model": model,
        **result,
        "tokens_per_pass": round(result["num_output_tokens"] / max(result["num_forward_passes"], 1), 3),
        "tokens_per_s": round(result["num_output_tokens"] / seconds, 1),
    }
    if not quiet:
        click.echo(
            f"\n== {model}: {answer['num_output_tokens']} tokens, {answer['num_forward_passes']} forward "
            f"passes ({answer['tokens_per_pass']} tokens/pass), {answer['tokens_per_s']} tokens/s"
        )
        click.echo(prompt + result["text"])
    return answer
