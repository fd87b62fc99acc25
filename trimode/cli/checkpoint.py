"""`trimode make-checkpoint`, `trimode quantize` and `trimode train-draft`: the commands that write
a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trimode.cli.common import SEED, CalibrationBar, FiniteFloat, echo_json
from trimode.errors import InputError


@click.command("make-checkpoint")
@click.option(
    "--random",
    "is_random",
    is_flag=True,
    required=True,
    help="Random weights (the only kind for now; the trained fixture ships separately).",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--hidden-size", type=click.IntRange(16, 4096), default=64, show_default=True, help="A multiple of 16.")
@click.option("--num-layers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--vocab-size", type=click.IntRange(300, 65536), default=384, show_default=True)
@click.option("--block-size", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--draft-adapter", is_flag=True, help="Also write a random linear_spec_lora/ draft adapter.")
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Split the weights over this many safetensors files (with an index); "
    "at most the number of tensors, 3 + 9 x layers.",
)
@click.option("--force", is_flag=True, help="Replace a previous make-checkpoint output (never another folder).")
def make_checkpoint(
    is_random: bool,
    out_dir: Path,
    seed: int,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    block_size: int,
    draft_adapter: bool,
    shards: int,
    force: bool,
) -> None:
    """Write a tiny random checkpoint in the exact NLD layout (config, weights, tokenizer)."""
    from trimode.make_checkpoint import make_random_checkpoint, tiny_spec

    if hidden_size % 16:
        raise click.BadParameter(
            f"expected a multiple of 16 (4 heads of an even head_dim >= 4), got {hidden_size}",
            param_hint="'--hidden-size'",
        )
    if shards > 3 + 9 * num_layers:
        raise click.BadParameter(
            f"{shards} shards for {3 + 9 * num_layers} tensors ({num_layers} layers): at most one shard per tensor",
            param_hint="'--shards'",
        )
    spec = tiny_spec(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        head_dim=hidden_size // 4,
        vocab_size=vocab_size,
        block_size=block_size,
    )
    path = make_random_checkpoint(
        out_dir, spec, seed=seed, with_draft_adapter=draft_adapter, num_shards=shards, force=force
    )
    click.echo(f"wrote {path}")


@click.command()
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option(
    "--kv-cache",
    type=click.Choice(["fp8", "none"]),
    default="fp8",
    show_default=True,
    help="Also calibrate an FP8 KV cache (k_scale / v_scale).",
)
@click.option(
    "--calib-data",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration text: a file, or a folder of text files [default: built-in set].",
)
@click.option(
    "--calib-samples", type=click.IntRange(1, 1 << 20), default=64, show_default=True, help="Calibration windows."
)
@click.option(
    "--calib-seq-len", type=click.IntRange(2, 1 << 20), default=256, show_default=True, help="Tokens per window."
)
@click.option("--force", is_flag=True, help="Replace a previous quantize output (never another folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def quantize(
    checkpoint_dir: Path,
    out_dir: Path,
    kv_cache: str,
    calib_data: Path | None,
    calib_samples: int,
    calib_seq_len: int,
    force: bool,
    as_json: bool,
) -> None:
    """Quantize CHECKPOINT_DIR to FP8 (E4M3 weights and activations, FP8 KV cache) with NVIDIA ModelOpt.

    Calibrates over causal, block (masked) and draft passes, so every mode's activations are
    covered; writes a unified Hugging Face FP8 checkpoint in the NLD layout with manifest.json.
    Embeddings and diffusion_head stay bf16.
    """
    from trimode.quantize import QuantizeSettings, quantize_checkpoint

    settings = QuantizeSettings(
        kv_cache=kv_cache, calib_data=calib_data, calib_samples=calib_samples, calib_seq_len=calib_seq_len
    )
    bar = CalibrationBar(calib_samples, as_json)
    try:
        path = quantize_checkpoint(checkpoint_dir, out_dir, settings, force=force, progress=bar.update)
    finally:
        bar.close()
    manifest = json.loads((path / "manifest.json").read_text())
    if as_json:
        echo_json(manifest)
        return
    cal = manifest["calibration"]
    click.echo(
        f"wrote {path}: FP8 weights/activations, KV cache {kv_cache}; calibrated on "
        f"{cal['num_tokens']} tokens ({cal['passes']}) in {cal['seconds']} s"
    )


@click.command("train-draft")
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Output checkpoint directory: the base files plus linear_spec_lora/.",
)
@click.option(
    "--rank", type=click.IntRange(1, 65536), default=None, help="LoRA rank [default: 64, or the input adapter's]."
)
@click.option(
    "--alpha",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="LoRA alpha; scale = alpha / rank [default: 2 x rank].",
)
@click.option(
    "--modules",
    default=None,
    help="Linears to adapt in every layer, comma-separated, of q_proj,k_proj,v_proj,o_proj,gate_proj,"
    "up_proj,down_proj [default: the input adapter's, else o_proj, NVIDIA's format]. Each "
    "adapted linear gets a merged draft copy at load time: its weights again in memory.",
)
@click.option(
    "--block-length",
    "block_lengths",
    default="8",
    show_default=True,
    help="Draft block length(s) to train on, comma-separated, cycled over steps (e.g. 4,8,16,32).",
)
@click.option(
    "--modes",
    default="self-spec,quadratic",
    show_default=True,
    help="Whose drafts to train, comma-separated, cycled over steps: self-spec (rows [seed, MASK...]) "
    "and quadratic (rows of MASKs after the verify chain, spec/quadratic.md).",
)
@click.option("--steps", type=click.IntRange(1, 10**7), default=200, show_default=True)
@click.option(
    "--lr",
    type=FiniteFloat(min=0, min_open=True),
    default=5e-3,
    show_default=True,
    help="Peak AdamW lr (warm-up, cosine to 10%).",
)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=4, show_default=True, help="Text windows per step.")
@click.option(
    "--weighting",
    type=click.Choice(["accept", "ce"]),
    default="accept",
    show_default=True,
    help="accept: each block's loss up to and including its first wrong draft; ce: the whole block.",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Text to continue: a file, or a folder of text files [default: the standard library "
    "training files the embedded checkpoint was trained on].",
)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--num-eval-prompts",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Held-out prompts for the acceptance before and after (0: skip).",
)
@click.option("--fresh", is_flag=True, help="Ignore an adapter the input already has and start a new one.")
@click.option("--force", is_flag=True, help="Replace a previous train-draft output (never another folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the training log as JSON.")
def train_draft(
    checkpoint_dir: Path,
    out_dir: Path,
    rank: int | None,
    alpha: float | None,
    modules: str | None,
    block_lengths: str,
    modes: str,
    steps: int,
    lr: float,
    batch_size: int,
    weighting: str,
    data: Path | None,
    seed: int,
    num_eval_prompts: int,
    fresh: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Train CHECKPOINT_DIR's draft adapter (linear_spec_lora/) so self-speculation accepts more per cycle.

    Self-distillation: the targets are the checkpoint's own AR greedy continuations of text windows;
    the draft pass is the runtime's (block pass over [seed, MASK...] after the adapter-off cached
    prefix, adapter on; for quadratic self-spec a row of MASKs after the verify chain). Base weights stay frozen; only the LoRA A/B train, on every layer's o_proj
    unless --modules names more. An input that already has an adapter is continued, with new LoRAs
    on the linears --modules adds (--fresh starts a new one). Writes the base files plus
    linear_spec_lora/ (PEFT format) to --out.
    """
    from trimode.training.draft import DraftSettings
    from trimode.training.draft import train_draft as run

    try:
        lengths = tuple(int(x) for x in block_lengths.split(","))
    except ValueError:
        raise InputError(f"--block-length: expected integers separated by commas, got {block_lengths!r}") from None
    names = None if modules is None else tuple(m.strip() for m in modules.split(",") if m.strip())
    settings = DraftSettings(
        rank=rank,
        alpha=alpha,
        modules=names,
        block_lengths=lengths,
        modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        weighting=weighting,
        data=data,
        seed=seed,
        num_eval_prompts=num_eval_prompts,
        fresh=fresh,
    )
    log = run(checkpoint_dir, out_dir, settings, force=force, progress=not as_json)
    if as_json:
        echo_json({k: v for k, v in log.items() if k != "history"} | {"out_dir": str(out_dir)})
        return
    hist = log["history"]
    n = min(20, len(hist))
    first, last = (sum(h["loss"] for h in part) / n for part in (hist[:n], hist[-n:]))
    click.echo(
        f"wrote {out_dir}: {','.join(log['modules'])} at rank {log['rank']}, alpha {log['alpha']:g}, "
        f"{len(hist)} steps in "
        f"{log['wall_time_s']} s, loss {first:.3f} -> {last:.3f}"
    )
    acc = log.get("held_out_acceptance")
    if acc:
        for run in acc["before"]:
            click.echo(f"held-out mean accepted per cycle, {run}: {acc['before'][run]:.2f} -> {acc['after'][run]:.2f}")
