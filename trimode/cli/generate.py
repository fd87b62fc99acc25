"""`trimode generate`: text from a checkpoint, an engine dir or a running server, in any mode."""

from __future__ import annotations

import time
from pathlib import Path

import click

from trimode.cli.common import (
    MODES,
    SEED,
    DeviceType,
    FiniteFloat,
    ThresholdType,
    echo_json,
    refuse_with_engine,
    resolve_checkpoint_dir,
)
from trimode.errors import InputError


def _check_prompts(ctx, param, prompts: tuple[str, ...]) -> tuple[str, ...]:
    from trimode.tokenizer import check_text

    for i, p in enumerate(prompts):
        try:
            check_text(p, f"prompt {i + 1}")
        except InputError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return prompts


@click.command()
@click.argument("prompts", nargs=-1, required=True, callback=_check_prompts)
@click.option(
    "--checkpoint",
    "checkpoint_dir",
    type=click.Path(path_type=Path),
    help="NLD checkpoint directory (default: the embedded checkpoint, where this build has one).",
)
@click.option(
    "--engine",
    "engine_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Run on a built engine dir (trimode build) instead of the eager model.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="ar",
    show_default=True,
    help="Generation mode; all use the same weights (quadratic: self-spec with one pass per cycle).",
)
@click.option(
    "--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Emit at most this many tokens."
)
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Sampling seed (temperature > 0).")
@click.option(
    "--block-length",
    type=click.IntRange(1, 65536),
    default=None,
    help="Diffusion / draft block length [default: the checkpoint's block_size].",
)
@click.option(
    "--threshold",
    type=ThresholdType(),
    default=None,
    help="Commit threshold: diffusion default 0.9, self-spec draft default 0 (one pass). "
    "'none' commits an even top-k split per step (diffusion).",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(min=1),
    default=None,
    help="Prefill the prompt in chunks of this many tokens.",
)
@click.option("--ignore-eos", is_flag=True, help="Keep generating past EOS (benchmarks).")
@click.option("--device", type=DeviceType(), default=None, help="cpu, cuda, cuda:N [default: cuda if present].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, tokens, statistics).")
@click.option(
    "--url",
    default=None,
    help="HOST:PORT of a running `trimode serve`: generate there (its gRPC or "
    "HTTP port, see --protocol) instead of in this process.",
)
@click.option(
    "--protocol",
    type=click.Choice(["grpc", "http"]),
    default="grpc",
    show_default=True,
    help="With --url: the server's protocol.",
)
@click.option("--stream", is_flag=True, help="With --url: print the text as the server streams it.")
@click.option(
    "--chat",
    is_flag=True,
    help="Each PROMPT is a user message: apply the checkpoint's chat template "
    "(as the OpenAI front end does) and print the reply.",
)
@click.option(
    "--chat-template",
    "chat_template_path",
    type=click.Path(path_type=Path),
    default=None,
    help="With --chat: a Jinja chat template to use instead of the checkpoint's.",
)
def generate(
    prompts: tuple[str, ...],
    checkpoint_dir: Path | None,
    engine_dir: Path | None,
    mode: str,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    block_length: int | None,
    threshold,
    prefill_chunk: int | None,
    ignore_eos: bool,
    device: str | None,
    as_json: bool,
    url: str | None,
    protocol: str,
    stream: bool,
    chat: bool,
    chat_template_path: Path | None,
) -> None:
    """Generate from one or more PROMPTS (a batch) in the chosen mode; print text and statistics.

    At temperature 0, self-spec emits exactly the AR tokens with fewer forward passes.
    With --url, each prompt is one request to the server's ensemble for the mode.
    """
    if chat_template_path is not None and not chat:
        raise click.UsageError("--chat-template needs --chat")
    if url is not None and chat:
        raise click.UsageError(
            "--url and --chat: chat with a server through its OpenAI front end "
            "(trimode serve --openai-port, /v1/chat/completions)"
        )
    if url is not None:
        remote = {
            "checkpoint": checkpoint_dir,
            "engine": engine_dir,
            "prefill-chunk": prefill_chunk,
            "device": device,
            "threshold": threshold == "none" or None,
        }
        given = [name for name, value in remote.items() if value]
        if given:
            raise click.UsageError(f"--url and --{given[0]}: the server fixes that")
        from trimode.cli.serve import generate_remote

        generate_remote(
            url,
            protocol,
            stream,
            prompts,
            mode,
            max_new_tokens,
            temperature,
            seed,
            block_length,
            threshold,
            ignore_eos,
            as_json,
        )
        return
    if stream:
        raise click.UsageError("--stream needs --url (a local single prompt streams anyway)")
    from trimode.llm import LLM, SamplingParams
    from trimode.tokenizer import IncrementalDetokenizer

    params = SamplingParams(
        mode=mode,
        max_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        block_length=block_length,
        threshold=threshold,
        ignore_eos=ignore_eos,
        prefill_chunk=prefill_chunk,
    )
    if engine_dir is not None:
        from trimode.builder.manifest import read_manifest

        refuse_with_engine(checkpoint=checkpoint_dir, prefill_chunk=prefill_chunk)
        read_manifest(engine_dir)  # an engine dir, or one line saying what it is instead
    llm = LLM(engine_dir or resolve_checkpoint_dir(checkpoint_dir), device=device)
    ck = llm.checkpoint
    shown_prompts = prompts
    if chat:  # the reply alone is printed; --json keeps each rendered prompt
        from trimode.chat import load_chat_template

        template = load_chat_template(ck.checkpoint_dir, chat_template_path)
        prompts = tuple(template.render([{"role": "user", "content": p}]) for p in prompts)
        shown_prompts = ("",) * len(prompts)
    stream = len(prompts) == 1 and not as_json
    detokenizer, shown = IncrementalDetokenizer(ck.tokenizer.decode), [shown_prompts[0]]

    def on_step(new: dict[int, list[int]]) -> None:
        """Print the text as it becomes final (a character split over tokens waits), after the prompt:
        once generation runs, so that bad input prints nothing."""
        click.echo(shown.pop() if shown else "", nl=False)
        click.echo(detokenizer.push(new.get(0, [])), nl=False)

    start = time.perf_counter()
    results = llm.generate(list(prompts), params, on_step=on_step if stream else None)
    elapsed = time.perf_counter() - start
    total = sum(r.stats["num_generated"] for r in results)
    summary = {
        "mode": params.mode,
        "checkpoint": str(ck.checkpoint_dir),
        "device": str(llm.device),
        "batch_size": len(results),
        "block_length": results[0].block_length,
        "num_generated": total,
        "elapsed_s": round(elapsed, 4),
        "tokens_per_s": round(total / elapsed, 2),
        "results": [
            {
                "prompt": r.prompt,
                "text": r.text,
                "tokens": r.token_ids,
                "finish_reason": r.finish_reason,
                "stats": r.stats,
            }
            for r in results
        ],
    }
    if as_json:
        echo_json(summary)
        return
    if stream:
        click.echo((shown.pop() if shown else "") + detokenizer.flush())
    else:
        for p, r in zip(shown_prompts, summary["results"]):
            click.echo(f"{p}{r['text']}")
    for i, r in enumerate(summary["results"]):
        s = r["stats"]
        accepted = f" mean_accepted={s['mean_accepted_length']:.2f}" if s["mean_accepted_length"] else ""
        click.echo(
            f"[{i}] {params.mode}: {s['num_generated']} tokens, {s['num_passes']} passes "
            f"{s['passes']}, {s['tokens_per_pass']:.2f} tokens/pass{accepted}, "
            f"finish={r['finish_reason']}",
            err=True,
        )
    click.echo(
        f"{total} tokens in {elapsed:.2f}s ({summary['tokens_per_s']} tokens/s) on {summary['device']}", err=True
    )
