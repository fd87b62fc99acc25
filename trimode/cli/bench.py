"""`trimode bench`: which mode to deploy at which load."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from trimode.cli.common import MODES, FiniteFloat, IntList, ModeList, echo_json, resolve_checkpoint_dir


def _host_port(ctx, param, value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[^\s/]+:\d{1,5}", value):
        raise click.BadParameter(f"{value!r}: expected HOST:PORT (no scheme), e.g. 127.0.0.1:8001", ctx, param)
    return value


@click.command()
@click.option(
    "--engine",
    "engine_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Bench a built engine dir (trimode build) in this process, through the in-flight batching "
    "loop the Triton engine model runs.",
)
@click.option(
    "--url",
    default=None,
    callback=_host_port,
    help="HOST:PORT of a running `trimode serve` (its gRPC or HTTP port, see --protocol).",
)
@click.option(
    "--protocol",
    type=click.Choice(["grpc", "http"]),
    default="grpc",
    show_default=True,
    help="With --url: the server's protocol (both stream, which gives the time to first token).",
)
@click.option(
    "--openai",
    "openai_url",
    default=None,
    help="Base URL of an OpenAI-compatible server (http://HOST:PORT): streamed /v1/completions, one "
    "model per mode named as the Triton ensembles (ar, diffusion, self_spec, quadratic, auto; with --prefix).",
)
@click.option("--prefix", default="", help="With --url or --openai: the model-name prefix the repo was written with.")
@click.option(
    "--metrics-url",
    default=None,
    callback=_host_port,
    help="With --url or --openai: HOST:PORT of the server's metrics (`serve --metrics-port`), from which "
    "each run's pass efficiency (the share of its time inside forward passes) is read.",
)
@click.option(
    "--modes",
    type=ModeList(),
    default=",".join(MODES),
    show_default=True,
    help="Modes to measure; AR is the baseline of every speed-up, so without it there are none.",
)
@click.option(
    "--concurrency",
    type=IntList(),
    default=None,
    help="Closed-loop client counts, comma-separated [default: 1,2,4,8,16; with --engine, those up to "
    "the engine's slots]. With --engine each must fit the slots; a server queues the excess.",
)
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(min=1),
    default=None,
    help="Requests per concurrency level, at least the highest level [default: 2 per client, at least 8].",
)
@click.option(
    "--duration",
    "duration_s",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="Seconds per concurrency level instead of --requests (requests sent by then finish and count).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Output tokens per request (every request makes exactly this many unless --stop-at-eos).",
)
@click.option(
    "--block-length",
    "block_lengths",
    type=IntList(),
    default=None,
    help="Block lengths for every mode but ar and auto, comma-separated: each is its own line "
    "[default: the engine's default block length]. auto is called naming none, as a client calls it: "
    "it chooses among the engine's.",
)
@click.option(
    "--prompts",
    "prompts_path",
    type=click.Path(path_type=Path),
    default=None,
    help='Prompt file: one prompt per line, or a .jsonl file of JSON strings or {"prompt": ...} '
    "objects (for prompts with newlines) [default: the embedded checkpoint's held-out prompts, "
    "as trimode eval uses them].",
)
@click.option(
    "--warmup",
    "num_warmup",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Untimed requests per mode and block length (with the longest prompt) before timing, and "
    "again before each timed run that follows another mode's (on CPU a mode's first passes after "
    "another's run slower).",
)
@click.option(
    "--repeats",
    "num_rounds",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Rounds of every mode at every concurrency, round-robin over the modes: tokens/s is the "
    "median round's, and the advice says when the best two overlap over their rounds "
    "(too close to call). Use 3 or more on a machine shared with other jobs.",
)
@click.option(
    "--stop-at-eos",
    is_flag=True,
    help="Let requests end at EOS (default: ignore it, so every request "
    "makes --max-tokens tokens and the modes do equal work).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    default=None,
    help="With --engine: the in-process engine's torch threads [default: 1, as `trimode serve` runs its "
    "engine model; torch's own default ran AR 3x slower at concurrency 1, its threads fighting the loop's].",
)
@click.option(
    "--save-step-times",
    is_flag=True,
    help="With --engine: store the step time of each mode auto chooses among (AR, self-spec and "
    "quadratic at each block length run), at each batch size run, in the engine dir's step_times.json, "
    "where auto starts from them wherever the engine is loaded next (a server too) instead of the "
    "times of its build (on CPU self-spec/8's step took 4.0x AR's served, 4.6x at the build). "
    "Measure at the threads the engine serves with (--threads' default).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write bench.json and bench.png (tokens/s and speed-up over AR vs concurrency) to this new folder.",
)
@click.option("--force", is_flag=True, help="Replace a previous bench --out folder (never another folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (no table).")
def bench(
    engine_dir: Path | None,
    url: str | None,
    protocol: str,
    openai_url: str | None,
    prefix: str,
    metrics_url: str | None,
    modes: tuple[str, ...],
    concurrency: tuple[int, ...] | None,
    num_requests: int | None,
    duration_s: float | None,
    max_tokens: int,
    block_lengths: tuple[int, ...] | None,
    prompts_path: Path | None,
    num_warmup: int,
    num_rounds: int,
    stop_at_eos: bool,
    threads: int | None,
    save_step_times: bool,
    out_dir: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Measure each mode at each concurrency on an engine dir (--engine) or a running server (--url,
    --openai), and say which mode (and block length) to deploy at which load.

    Per mode and concurrency c (c clients, each sending its next request when its previous one
    finishes; greedy, temperature 0): output tokens/s, tokens per forward pass, self-spec's mean
    accepted length, time to first token and request latency (p50, p95), and the speed-up over AR
    measured in the same run. Prints a table and ends with advice: the fastest mode at each
    concurrency, for this engine on this machine.
    """
    from tqdm import tqdm

    from trimode.bench import BenchSettings, EngineTarget, TritonTarget, run_bench
    from trimode.bench.openai import OpenAITarget
    from trimode.bench.prompts import held_out_prompts, read_prompts
    from trimode.bench.report import STAGE, format_table, write_bench_dir
    from trimode.bench.runner import DEFAULT_CONCURRENCY
    from trimode.bench.targets import Target
    from trimode.stage_output import check_output

    given = [name for name, v in (("--engine", engine_dir), ("--url", url), ("--openai", openai_url)) if v]
    if len(given) != 1:
        raise click.UsageError(
            "pass one of --engine, --url and --openai" + (f" (got {' and '.join(given)})" if given else "")
        )
    if threads is not None and engine_dir is None:
        raise click.UsageError("--threads sets this process's torch threads: it needs --engine")
    if prefix and engine_dir is not None:
        raise click.UsageError("--prefix names a server's models: it needs --url or --openai")
    if metrics_url and engine_dir is not None:
        raise click.UsageError("--metrics-url names a server's metrics: it needs --url or --openai")
    if save_step_times and engine_dir is None:
        raise click.UsageError("--save-step-times stores the times with an engine dir: it needs --engine")
    if save_step_times and "ar" not in modes:
        raise click.UsageError("--save-step-times needs ar among --modes: auto scales every time by AR's")
    options: dict[str, Any] = dict(
        modes=modes,
        num_requests=num_requests,
        duration_s=duration_s,
        max_tokens=max_tokens,
        block_lengths=block_lengths or (),
        ignore_eos=not stop_at_eos,
        num_warmup=num_warmup,
        num_rounds=num_rounds,
    )
    BenchSettings(concurrency=concurrency or (1,), **options)  # bad settings fail before any loading
    if out_dir is not None:
        check_output(out_dir, STAGE, [p for p in (engine_dir, prompts_path) if p is not None], force=force)
    prompts = read_prompts(prompts_path) if prompts_path else held_out_prompts(resolve_checkpoint_dir(None))

    if engine_dir is not None:
        from trimode.builder.manifest import read_manifest

        slots = read_manifest(engine_dir)["settings"]["max_batch_size"]
        over = [c for c in concurrency or () if c > slots]
        if over:
            raise click.BadParameter(
                f"{over[0]}: the engine runs {slots} requests at once (its max_batch_size); "
                f"rebuild it with a larger one, or bench a server, which queues",
                param_hint="'--concurrency'",
            )
        dropped = [] if concurrency else [c for c in DEFAULT_CONCURRENCY if c > slots]
        concurrency = concurrency or tuple(c for c in DEFAULT_CONCURRENCY if c <= slots)
        import torch

        from trimode.triton_repo.settings import DEFAULT_ENGINE_THREADS

        if save_step_times and not os.access(engine_dir, os.W_OK):
            raise click.BadParameter(
                f"{engine_dir}: not writable here, so the step times could not be saved", param_hint="'--engine'"
            )
        torch.set_num_threads(threads or DEFAULT_ENGINE_THREADS)
        target: Target = EngineTarget(engine_dir, time_steps=save_step_times)
    elif url:
        target = TritonTarget(url, protocol, prefix, metrics_url=metrics_url)
    else:
        assert openai_url is not None  # one of the three, checked above
        target = OpenAITarget(openai_url, prefix, metrics_url=metrics_url)
    bars = []

    def on_start(num_cells: int) -> None:
        bars.append(tqdm(total=num_cells, desc="bench", unit="run", disable=as_json, file=sys.stderr))

    def on_cell(variant: str, c: int) -> None:
        bars[0].set_postfix_str(f"{variant} c={c}")
        bars[0].update()

    try:
        settings = BenchSettings(concurrency=concurrency or DEFAULT_CONCURRENCY, **options)
        report = run_bench(target, prompts, settings, on_start, on_cell)
    finally:
        for bar in bars:
            bar.close()
        target.close()
    unsaved = None  # why the step times were not saved: said after the report, which is not lost
    if save_step_times:
        from trimode.errors import EngineError

        assert isinstance(target, EngineTarget)
        about = {"date": report["date"], "tool": report["tool"], "machine": report["machine"]}
        try:
            path, measured = target.save_step_times(about)
        except EngineError as e:
            unsaved = e
            report["notes"].append(f"step times not saved: {e}")
        else:
            sizes = sorted({int(size) for by_size in measured.values() for size in by_size})
            report["notes"].append(
                f"step times of {', '.join(measured)} at batch sizes {', '.join(map(str, sizes))} saved to "
                f"{path}: auto starts from them wherever this engine is loaded next"
            )
    if engine_dir is not None and dropped:
        report["notes"].append(
            f"concurrency {', '.join(map(str, dropped))} not measured: above the engine's {target.slots} slots"
        )
    if out_dir is not None:
        write_bench_dir(report, out_dir, force)
    if as_json:
        echo_json(report)
    else:
        click.echo(format_table(report))
        if out_dir is not None:
            click.echo(f"wrote {out_dir}/bench.json and bench.png", err=True)
    if unsaved is not None:
        raise unsaved
