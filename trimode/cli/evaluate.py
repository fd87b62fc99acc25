"""`trimode eval`: perplexity and per-mode speed and agreement of a checkpoint or engine dir."""

from __future__ import annotations

from pathlib import Path

import click

from trimode.cli.common import DeviceType, IntList, echo_json, load_engine, resolve_checkpoint_dir, resolve_device
from trimode.errors import InputError


@click.command("eval")
@click.argument("checkpoint_dir", required=False, type=click.Path(path_type=Path))
@click.option("--num-prompts", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--block-lengths",
    type=IntList(),
    default=None,
    help="Self-speculation block lengths to measure, comma-separated "
    "[default: 4,8,16,32; with --engine, the engine's].",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--max-ppl-windows",
    type=click.IntRange(min=1),
    default=None,
    help="Perplexity over at most this many held-out windows [default: all].",
)
@click.option(
    "--against",
    "against_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Another checkpoint (e.g. the bf16 source of an FP8 one): compare per mode.",
)
@click.option(
    "--engine",
    "engine_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Generate through a built engine dir (perplexity stays the eager model's).",
)
@click.option(
    "--against-no-adapter",
    is_flag=True,
    help="Compare with the same checkpoint without its draft adapter (acceptance side by side).",
)
@click.option("--device", type=DeviceType(), default=None, help="cpu, cuda, cuda:N [default: cuda if present].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_command(
    checkpoint_dir: Path | None,
    num_prompts: int,
    prompt_len: int,
    max_new_tokens: int,
    block_lengths: tuple[int, ...] | None,
    batch_size: int,
    max_ppl_windows: int | None,
    against_dir: Path | None,
    engine_dir: Path | None,
    against_no_adapter: bool,
    device: str | None,
    as_json: bool,
) -> None:
    """Evaluate CHECKPOINT_DIR (default: the embedded one) on held-out standard-library text.

    Reports AR perplexity and, per mode at temperature 0: tokens per forward pass (every pass
    counted), linear and quadratic self-spec mean accepted length per block length, tokens/s,
    agreement with AR.
    With --against OTHER: the same for OTHER, the perplexity change, and per-mode greedy token
    agreement between the two. --against-no-adapter compares with the checkpoint itself, its
    linear_spec_lora/ draft adapter left out.
    """
    from trimode.checkpoint import load_checkpoint
    from trimode.evaluate import EvalSettings, evaluate

    lengths = block_lengths or (4, 8, 16, 32)
    if against_dir and against_no_adapter:
        raise InputError("--against and --against-no-adapter: pass one of them")
    new_engine = None
    if engine_dir is not None:
        built = load_engine(engine_dir, checkpoint_dir, device)
        ck, new_engine = built.checkpoint, built.new_engine
        lengths = lengths if block_lengths is not None else built.block_lengths
    else:
        ck = load_checkpoint(resolve_checkpoint_dir(checkpoint_dir), device=resolve_device(device))
    if against_no_adapter and not ck.model.has_draft_adapter:
        raise InputError(f"--against-no-adapter: {ck.checkpoint_dir} has no draft adapter (linear_spec_lora/)")
    against = load_checkpoint(against_dir, device=resolve_device(device)) if against_dir else None
    if against_no_adapter:
        against = load_checkpoint(ck.checkpoint_dir, device=resolve_device(device), draft_adapter=False)
    settings = EvalSettings(
        num_prompts=num_prompts,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        block_lengths=lengths,
        batch_size=batch_size,
        ppl_max_windows=max_ppl_windows,
    )
    report = evaluate(
        ck,
        settings,
        against,
        progress=None if as_json else lambda name: click.echo(f"... {name}", err=True),
        new_engine=new_engine,
    )
    if as_json:
        echo_json(report)
        return
    click.echo(format_report(report))


def format_report(report: dict) -> str:
    lines = [
        f"held-out perplexity (AR): {report['perplexity']:.3f} over {report['num_held_out_tokens']} tokens",
        f"{'mode':<14}{'tok/pass':>9}{'accepted':>10}{'tok/s':>9}{'agree(AR)':>11}{'prefix':>8}",
    ]
    for name, m in report["modes"].items():
        acc = f"{m['mean_accepted_length']:.2f}" if m["mean_accepted_length"] else "-"
        agree = f"{m['token_agreement']:.3f}" if "token_agreement" in m else "-"
        prefix = f"{m['mean_common_prefix']:.1f}" if "mean_common_prefix" in m else "-"
        lines.append(f"{name:<14}{m['tokens_per_pass']:>9.3f}{acc:>10}{m['tokens_per_s']:>9.1f}{agree:>11}{prefix:>8}")
    lines.append(f"self-spec (linear and quadratic) equals AR at every block length: {report['self_spec_equals_ar']}")
    other = report.get("against")
    if other:
        adapter = "with" if other.get("draft_adapter") else "without"
        lines.append(
            f"against {other['checkpoint']} ({adapter} draft adapter): perplexity {other['perplexity']:.3f} "
            f"({100 * other['perplexity_change']:+.2f}% for {report['checkpoint']})"
        )
        lines.append(f"{'mode':<14}{'agree':>9}{'prefix':>8}{'accepted':>10}{'other acc.':>11}")
        for name, a in other["agreement"].items():
            mine, theirs = report["modes"][name]["mean_accepted_length"], other["modes"][name]["mean_accepted_length"]
            lines.append(
                f"{name:<14}{a['token_agreement']:>9.3f}{a['mean_common_prefix']:>8.1f}"
                f"{(f'{mine:.2f}' if mine else '-'):>10}{(f'{theirs:.2f}' if theirs else '-'):>11}"
            )
    return "\n".join(lines)
