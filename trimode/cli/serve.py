"""`trimode repo` and `trimode serve`: the Triton model repository stage and its server; and the
client side of `trimode generate --url`."""

from __future__ import annotations

import contextlib
import signal
import threading
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
@click.option(
    "--decoupled/--no-decoupled",
    default=True,
    show_default=True,
    help="Streaming repository (Triton's decoupled policy, TensorRT-LLM's decoupled_mode: streams, several "
    "prompts a request, gRPC's streaming RPC) or one that answers plain infer with one response.",
)
@click.option(
    "--ensemble-mode",
    type=click.Choice(MODES),
    default=None,
    help="Also serve this mode as the model `ensemble`, the name TensorRT-LLM's client scripts call.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    default=None,
    help="The engine model's torch threads; the other models get one [default: 1, measured: docs/performance.md].",
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
    decoupled: bool,
    ensemble_mode: str | None,
    threads: int | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a Triton model repository serving ENGINE_DIR (trimode build): one engine model that
    batches requests of every mode in flight, tokenizer pre- and post-processing, and one ensemble
    per mode (ar, diffusion, self_spec, quadratic, auto) with TensorRT-LLM's ensemble tensors. Serve it with
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
        decoupled=decoupled,
        ensemble_mode=None if ensemble_mode is None else Mode(ensemble_mode),
        threads=threads or 0,
    )
    path = write_model_repo(engine_dir, out_dir, settings, force)
    manifest = read_repo_manifest(path)
    if as_json:
        echo_json(manifest)
        return
    names = [*manifest["ensembles"].values(), *manifest["aliases"]]
    click.echo(f"wrote {path}: ensembles {', '.join(names)} over {manifest['engine']['path']}")


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
@click.option(
    "--openai-max-body-bytes",
    type=click.IntRange(1, 1 << 40),
    default=None,
    help="With --openai-port: the largest request body; past it a 413 [default: 4 MiB].",
)
@click.option(
    "--openai-read-timeout",
    type=click.FloatRange(0, 86400, min_open=True),
    default=None,
    help="With --openai-port: seconds a request may take to arrive whole (408 past it), and an idle "
    "connection stays open [default: 30].",
)
@click.option(
    "--openai-max-connections",
    type=click.IntRange(1, 1 << 20),
    default=None,
    help="With --openai-port: open connections served at once; past it a 503 [default: 256].",
)
@click.option(
    "--drain-timeout",
    "drain_timeout_s",
    type=click.FloatRange(0, 86400),
    default=30.0,
    show_default=True,
    help="On SIGTERM, seconds the requests in flight may take to finish before they are cut (0: at once).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    default=None,
    help="The engine model's torch threads [default: the repository's, `trimode repo --threads`].",
)
def serve(
    repo_dir: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    openai_port: int | None,
    chat_template_path: Path | None,
    openai_max_body_bytes: int | None,
    openai_read_timeout: float | None,
    openai_max_connections: int | None,
    drain_timeout_s: float,
    threads: int | None,
) -> None:
    """Start tritonserver on REPO_DIR (trimode repo) and wait until every model is ready; print the
    endpoints, then serve until SIGTERM or Ctrl-C. Uses the tritonserver on PATH, else the one in the
    nvidia-pytriton wheel (CPU machines).

    SIGTERM drains: new requests get UNAVAILABLE (503 on the OpenAI port), those in flight finish
    (at most --drain-timeout seconds, then they are cut), tritonserver stops, exit 0; a second
    SIGTERM or Ctrl-C cuts the drain short. Ctrl-C stops at once, cutting what is in flight (exit
    130). If tritonserver or a model's python backend stub dies, the server is stopped and the
    command exits 1 with an error naming it, for a supervisor to restart it.

    With --openai-port, an OpenAI-compatible front end runs in this process too: one model per
    mode, named as the ensembles; chat requests use the checkpoint's chat template."""
    from trimode.triton_repo.server import Ports

    limits = {
        "max_body_bytes": openai_max_body_bytes,
        "read_timeout_s": openai_read_timeout,
        "max_connections": openai_max_connections,
    }
    limits = {name: value for name, value in limits.items() if value is not None}
    if openai_port is None and (chat_template_path is not None or limits):
        raise click.UsageError(
            "--chat-template and --openai-* need --openai-port (Triton's own endpoints take prompts)"
        )
    with serving(
        repo_dir,
        host,
        Ports(http_port, grpc_port, metrics_port),
        openai_port=openai_port,
        chat_template_path=chat_template_path,
        openai_limits=limits,
        drain_timeout_s=drain_timeout_s,
        threads=threads,
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
    openai_limits: dict | None = None,
    drain_timeout_s: float = 30.0,
    threads: int | None = None,
) -> Iterator:
    """A started tritonserver on repo_dir (its endpoints printed to stderr) and, with openai_port,
    the OpenAI front end in this process (openai_limits: its keyword arguments), both stopped on
    leaving. SIGTERM is raised as Interrupted meanwhile: while loading it stops them as Ctrl-C does
    (exit 143); once serving it drains them (drain_timeout_s at most) and ends the with block without
    an error. The server's log goes to log_path, else to this terminal. threads: the engine model's torch
    threads (None: the repository's)."""
    from trimode.decoding.settings import check_switches
    from trimode.triton_repo.server import TritonServer, check_host
    from trimode.triton_repo.writer import read_repo_manifest

    check_host(host)  # before anything binds it: the first to fail would blame its port
    check_switches()
    manifest = read_repo_manifest(repo_dir)
    check_ports(ports, openai_port)

    def on_sigterm(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    server = TritonServer(repo_dir, host, ports, log_path, threads=threads)
    frontend = None
    is_serving = is_draining = False
    try:
        if openai_port is not None:  # listening before tritonserver starts: a taken port fails at once
            from trimode.triton_repo.openai_api import OpenAIFrontend

            local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # where this process reaches gRPC
            grpc_url = f"[{local}]:{ports.grpc}" if ":" in local else f"{local}:{ports.grpc}"
            frontend = OpenAIFrontend(
                repo_dir, grpc_url, host, openai_port, chat_template_path, **(openai_limits or {})
            ).open()
        server.start()
        endpoints = server.endpoints
        openai = f", OpenAI {frontend.start().endpoint}" if frontend else ""
        click.echo(
            f"serving {', '.join(manifest['ensembles'].values())}: HTTP {endpoints['http']}, "
            f"gRPC {endpoints['grpc']}, metrics {endpoints['metrics']}{openai}",
            err=True,
        )
        is_serving = True
        yield server
    except Interrupted as e:
        if not (is_serving and e.signum == signal.SIGTERM):
            raise
        is_draining = True  # and the with block ends without an error: a drain is how the server stops
    finally:
        # From here a signal only hurries the stop along: an exception now would leave processes behind.
        hurry = threading.Event()
        handlers = {s: signal.signal(s, lambda signum, frame: hurry.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _stop(server, frontend, drain_timeout_s if is_draining else None, hurry)
        finally:
            signal.signal(signal.SIGINT, handlers[signal.SIGINT])
            signal.signal(signal.SIGTERM, previous)


def _stop(server, frontend, drain_timeout_s: float | None, hurry: threading.Event) -> None:
    """Drain for up to drain_timeout_s (None: no drain) or until hurry is set, then stop tritonserver and
    the front end: tritonserver first, so that what is still in flight fails fast instead of holding the
    front end."""
    if drain_timeout_s is not None:
        click.echo(
            f"SIGTERM: draining; new requests get UNAVAILABLE (503 on the OpenAI port); waiting up to "
            f"{drain_timeout_s:g} s for those in flight",
            err=True,
        )
        start = time.monotonic()
        if server.drain(drain_timeout_s, frontend, hurry):
            click.echo(f"drained in {time.monotonic() - start:.1f} s; stopping", err=True)
        elif server.failure is None:
            cause = "a second signal" if hurry.is_set() else f"--drain-timeout {drain_timeout_s:g} s"
            click.echo(f"{cause}: cutting the requests still in flight; stopping", err=True)
    elif frontend is not None:
        frontend.start_draining()
    server.stop()
    if frontend is not None:
        frontend.stop()


def check_ports(ports, openai_port: int | None = None) -> None:
    given = [ports.http, ports.grpc, ports.metrics, *([openai_port] if openai_port is not None else [])]
    if len(set(given)) != len(given):
        names = "HTTP, gRPC, metrics and OpenAI" if openai_port is not None else "HTTP, gRPC and metrics"
        raise click.BadParameter(f"the {names} ports must differ", param_hint="'--*-port'")


def wait_until_stopped(server) -> None:
    """Serve until Ctrl-C or SIGTERM (raised as interrupts). A server that dies, tritonserver or a model's
    python backend stub (the watchdog in server.py has stopped it then), is an error: exit 1, one line
    naming what died, so that a supervisor restarts the command."""
    while not server.wait_failed(0.5):
        pass
    raise click.ClickException(server.failure)


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
    inputs = {"max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
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
