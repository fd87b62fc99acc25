"""`trimode repo` and `trimode serve`: the Triton model repository stage and its server; and the
client side of `trimode generate --url`."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import click

from trimode.cli.common import MODES, ModeList, echo_json
from trimode.errors import Interrupted


@click.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="The model repository to write.")
@click.option("--prefix", default="", help="Prepended to every model name (nld_ -> nld_ar, nld_engine, ...).")
@click.option("--modes", type=ModeList(), default=",".join(MODES), show_default=True, help="One ensemble per mode.")
@click.option(
    "--max-batch-size",
    type=click.IntRange(1, 1 << 20),
    default=None,
    help="Triton's max_batch_size of every model, at most the engine's [default: the engine's].",
)
@click.option(
    "--instances",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Pre- and post-processing instances (the engine model is one: one KV pool).",
)
@click.option(
    "--max-queue-delay-us",
    type=click.IntRange(0, 1 << 30),
    default=0,
    show_default=True,
    help="The engine model's dynamic batcher delay.",
)
@click.option(
    "--max-queued-requests",
    type=click.IntRange(1, 1 << 20),
    default=None,
    help="Requests waiting for a slot before new ones get 'overloaded' [default: 8 x the engine's slots].",
)
@click.option("--force", is_flag=True, help="Replace a previous repo output (never another folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def repo(
    engine_dir: Path,
    out_dir: Path,
    prefix: str,
    modes: tuple[str, ...],
    max_batch_size: int | None,
    instances: int,
    max_queue_delay_us: int,
    max_queued_requests: int | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a Triton model repository serving ENGINE_DIR (trimode build): one engine model that
    batches requests of every mode in flight, tokenizer pre- and post-processing, and one ensemble
    per mode (ar, diffusion, self_spec) with TensorRT-LLM's ensemble tensors. Serve it with
    `trimode serve REPO`. ENGINE_DIR is checked as loading it does (manifest, file digests, versions,
    device; not the self-test, which the server runs when it loads it) before anything is written."""
    from trimode.passes import Mode
    from trimode.triton_repo.settings import RepoSettings
    from trimode.triton_repo.writer import read_repo_manifest, write_model_repo

    settings = RepoSettings(
        prefix=prefix,
        modes=tuple(Mode(m) for m in modes),
        max_batch_size=max_batch_size,
        instances=instances,
        max_queue_delay_us=max_queue_delay_us,
        max_queued_requests=max_queued_requests,
    )
    path = write_model_repo(engine_dir, out_dir, settings, force)
    manifest = read_repo_manifest(path)
    if as_json:
        echo_json(manifest)
        return
    click.echo(f"wrote {path}: ensembles {', '.join(manifest['ensembles'].values())} over {manifest['engine']['path']}")


@click.command()
@click.argument("repo_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option(
    "--openai-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Also serve OpenAI's /v1/completions, /v1/chat/completions and /v1/models on this port.",
)
@click.option(
    "--chat-template",
    "chat_template_path",
    type=click.Path(path_type=Path),
    default=None,
    help="With --openai-port: a Jinja chat template to use instead of the checkpoint's.",
)
def serve(
    repo_dir: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    openai_port: int | None,
    chat_template_path: Path | None,
) -> None:
    """Start tritonserver on REPO_DIR (trimode repo) and wait until every model is ready; print the
    endpoints, then serve until Ctrl-C or SIGTERM, which stop the server cleanly. Uses the
    tritonserver on PATH, else the one in the nvidia-pytriton wheel (CPU machines).

    With --openai-port, an OpenAI-compatible front end runs in this process too: one model per
    mode, named as the ensembles; chat requests use the checkpoint's chat template."""
    from trimode.triton_repo.server import Ports

    if chat_template_path is not None and openai_port is None:
        raise click.UsageError("--chat-template needs --openai-port (Triton's own endpoints take prompts)")
    with serving(
        repo_dir,
        host,
        Ports(http_port, grpc_port, metrics_port),
        openai_port=openai_port,
        chat_template_path=chat_template_path,
    ) as server:
        wait_until_stopped(server)


@contextlib.contextmanager
def serving(
    repo_dir: Path,
    host: str,
    ports,
    log_path: Path | None = None,
    openai_port: int | None = None,
    chat_template_path: Path | None = None,
) -> Iterator:
    """A started tritonserver on repo_dir (its endpoints printed to stderr) and, with openai_port,
    the OpenAI front end in this process, both stopped on leaving; SIGTERM is raised as Interrupted
    meanwhile, so it stops them as Ctrl-C does. The server's log goes to log_path, else to this terminal."""
    from trimode.triton_repo.server import TritonServer, check_host
    from trimode.triton_repo.writer import read_repo_manifest

    check_host(host)  # before anything binds it: the first to fail would blame its port
    manifest = read_repo_manifest(repo_dir)
    check_ports(ports, openai_port)

    def on_sigterm(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    server = TritonServer(repo_dir, host, ports, log_path)
    frontend = None
    try:
        if openai_port is not None:  # listening before tritonserver starts: a taken port fails at once
            from trimode.triton_repo.openai_api import OpenAIFrontend

            local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # where this process reaches gRPC
            grpc_url = f"[{local}]:{ports.grpc}" if ":" in local else f"{local}:{ports.grpc}"
            frontend = OpenAIFrontend(repo_dir, grpc_url, host, openai_port, chat_template_path).open()
        server.start()
        endpoints = server.endpoints
        openai = f", OpenAI {frontend.start().endpoint}" if frontend else ""
        click.echo(
            f"serving {', '.join(manifest['ensembles'].values())}: HTTP {endpoints['http']}, "
            f"gRPC {endpoints['grpc']}, metrics {endpoints['metrics']}{openai}",
            err=True,
        )
        yield server
    finally:
        if frontend is not None:
            frontend.stop()
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def check_ports(ports, openai_port: int | None = None) -> None:
    given = [ports.http, ports.grpc, ports.metrics, *([openai_port] if openai_port is not None else [])]
    if len(set(given)) != len(given):
        names = "HTTP, gRPC, metrics and OpenAI" if openai_port is not None else "HTTP, gRPC and metrics"
        raise click.BadParameter(f"the {names} ports must differ", param_hint="'--*-port'")


def wait_until_stopped(server) -> None:
    """Serve until Ctrl-C or SIGTERM (raised as an interrupt); a server that dies is an error."""
    while server.process.poll() is None:
        time.sleep(0.5)
    raise click.ClickException(f"tritonserver exited with status {server.process.returncode}")


def generate_remote(
    url: str,
    protocol: str,
    stream: bool,
    prompts: tuple[str, ...],
    mode: str,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    block_length: int | None,
    threshold: float | None,
    ignore_eos: bool,
    as_json: bool,
) -> None:
    """`trimode generate --url`: one request per prompt to the mode's ensemble."""
    from trimode.triton_repo import client

    model = client.model_name(mode)
    inputs = {"max_tokens": max_new_tokens, "temperature": temperature, "random_seed": seed}
    inputs |= {"block_length": block_length} if block_length is not None else {}
    inputs |= {"threshold": threshold} if threshold is not None else {}
    inputs |= {"end_id": -1} if ignore_eos else {}
    results = []
    for prompt in prompts:
        request = {"text_input": prompt, **inputs}
        try:
            if stream and not as_json:
                chunks = (
                    client.stream_grpc(url, model, request)
                    if protocol == "grpc"
                    else client.stream_http(url, model, request)
                )
                texts: list[str] = []
                for last in chunks:
                    click.echo(("" if texts else prompt) + last["text"], nl=False)  # the prompt once it answers
                    texts.append(last["text"])
                click.echo()
                result = {**last, "text": "".join(texts)}
            else:
                result = client.infer(url, model, request, protocol)
                if not as_json:
                    click.echo(prompt + result["text"])
        except client.NoAnswer as e:
            raise client.NoAnswer(f"--url {e}") from None
        results.append({"prompt": prompt, **result})
        if not as_json:
            click.echo(
                f"{model}: {result['num_output_tokens']} tokens, {result['num_forward_passes']} passes, "
                f"finish={result['finish_reason']}",
                err=True,
            )
    if as_json:
        echo_json({"mode": mode, "url": url, "protocol": protocol, "results": results})
