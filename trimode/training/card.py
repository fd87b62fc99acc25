"""Evaluate a trained fixture and write its model card (README.md) and eval.json beside it.

python -m trimode.training.card trimode/assets/default
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import click
import torch

from trimode.checkpoint import ADAPTER_DIR, load_checkpoint
from trimode.evaluate import EvalSettings, evaluate
from trimode.training.corpus import HELD_OUT


def model_card(spec: dict, log: dict, report: dict, machine: str, draft_log: dict | None = None) -> str:
    s, hist = log["settings"], log["history"]
    n = min(20, len(hist))
    first = {k: sum(h[k] for h in hist[:n]) / n for k in ("ar", "diffusion")}
    last = {k: sum(h[k] for h in hist[-n:]) / n for k in ("ar", "diffusion")}
    base = report.get("against", {}).get("modes", {})  # the same checkpoint without its draft adapter

    def without(name: str, key: str) -> str:
        return f" | {base[name][key] or '-'}" if base else ""

    rows = "\n".join(
        f"| {name} | {m['tokens_per_pass']:.3f}{without(name, 'tokens_per_pass')} | {m['mean_accepted_length'] or '-'}"
        f"{without(name, 'mean_accepted_length')} | {m['tokens_per_s']}{without(name, 'tokens_per_s')} | "
        f"{m.get('token_agreement', '-')} | {m.get('mean_common_prefix', '-')} |"
        for name, m in report["modes"].items()
    )
    header = (
        "| mode / block length | tokens per pass | no adapter | mean accepted per cycle | no adapter | tokens/s | "
        "no adapter | token agreement with AR | mean common prefix |\n|---|---|---|---|---|---|---|---|---|"
        if base
        else "| mode / block length | tokens per pass | mean accepted per cycle | tokens/s | "
        "token agreement with AR | mean common prefix |\n|---|---|---|---|---|---|"
    )
    e = report["settings"]
    return f"""# trimode default checkpoint: a small tri-mode (AR + block diffusion) model of Python code

Trained by `python -m trimode.training.train` (this repository) with the joint objective of the
Nemotron-Labs Diffusion recipe: L = L_AR + {s["alpha"]} L_diff over a [noisy | clean] 2L input
(spec §9), from scratch. It exists so tests, demos and benchmarks run on a model whose diffusion
drafts mean something. It is not a useful code model.

## Model
NLD layout, `model_type: nemotron_labs_diffusion`, bf16 safetensors, {log["num_params"]:,} parameters:
hidden {spec["hidden_size"]}, {spec["num_hidden_layers"]} layers, {spec["num_attention_heads"]} query heads /
{spec["num_key_value_heads"]} KV heads of {spec["head_dim"]}, MLP {spec["intermediate_size"]}, vocabulary
{spec["vocab_size"]} (byte-level BPE; `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3, `<mask>` 4), published YaRN
RoPE parameters, `block_size` {spec["block_size"]}. {_adapter_line(draft_log)}

## Data
The Python standard library of the training interpreter ({log.get("python", "CPython")}): {log["num_train_files"]}
files, {log["num_train_tokens"]:,} training tokens (test suites and vendored code left out). Held out: a
fixed list of {len(HELD_OUT)} modules present in
Python 3.10-3.13 (`trimode/training/corpus.py`), {report["num_held_out_tokens"]:,} tokens.

## Training
{_stages(log)}Diffusion block sizes cycled over {tuple(s["block_sizes"])} so one checkpoint drafts at every
block length served; cosine decay to 10% of the peak lr, bf16 autocast {s["use_bf16_autocast"]}, on {machine}.
Loss of this stage, mean of its first and last {n} steps: AR {first["ar"]:.3f} -> {last["ar"]:.3f},
diffusion (1/p-weighted) {first["diffusion"]:.3f} -> {last["diffusion"]:.3f}.

## Evaluation (`trimode eval`, temperature 0, {e["num_prompts"]} held-out prompts of {e["prompt_len"]} tokens,
{e["max_new_tokens"]} new tokens each, batch {e["batch_size"]}, {report["date"]}, {machine})
Held-out AR perplexity: **{report["perplexity"]:.3f}**.

{header}
{rows}

Every pass is counted (prefill, draft, verify, denoise, refresh). Diffusion runs at block length
{spec["block_size"]} with threshold 0.9. Self-speculation emits exactly the AR tokens at every block
length: {report["self_spec_equals_ar"]}.{_draft_section(draft_log, report)}
"""


def _adapter_line(draft_log: dict | None) -> str:
    if draft_log is None:
        return "No draft adapter."
    modules = ", ".join(draft_log.get("modules", ["o_proj"]))
    return (
        f"Draft adapter `linear_spec_lora/` (PEFT LoRA on every layer's {modules}, r={draft_log['rank']}, "
        f"alpha={draft_log['alpha']:g}), used only by self-speculation's draft pass."
    )


def _block_8(acceptance: dict) -> float | None:
    """Linear self-spec's held-out acceptance at block 8 (keyed "8" by logs before quadratic rows trained)."""
    return acceptance.get("self-spec/8", acceptance.get("8"))


def _previous_runs(draft_log: dict) -> str:
    runs = draft_log.get("previous", [])
    if not runs:
        return ""
    done = "; ".join(
        f"{r['settings']['steps']} steps at lr {r['settings']['lr']} ({r['wall_time_s'] / 60:.1f} min, "
        f"{r['num_threads']} threads; held-out accepted at block 8 "
        f"{_block_8(r['held_out_acceptance']['before'])} -> {_block_8(r['held_out_acceptance']['after'])})"
        for r in runs
        if r.get("held_out_acceptance")
    )
    return f"\nIt continued an adapter trained before by `train-draft` ({done})."


def _draft_section(draft_log: dict | None, report: dict) -> str:
    """How the draft adapter was trained (`trimode train-draft`) and what it changed."""
    if draft_log is None:
        return ""
    s, hist = draft_log["settings"], draft_log["history"]
    n = min(20, len(hist))
    first, last = ({k: sum(h[k] for h in part) / n for k in ("loss", "accepted")} for part in (hist[:n], hist[-n:]))
    return f"""

## Draft adapter (`trimode train-draft`)
Self-distilled: {len(hist)} steps of {s["batch_size"]} windows ({s["prompt_len"]}-token prompts of the
{draft_log["source"]}) continued by this checkpoint's own AR greedy decoding for {s["gen_len"]} tokens; every
offset of a continuation is a draft block [seed, MASK x (L-1)] after the adapter-off prefix (quadratic
self-spec's: [MASK x L]), modes {", ".join(s.get("modes", ["self-spec"]))}, block
length(s) {", ".join(map(str, s["block_lengths"]))}, up to {s["draft_tokens"]} draft tokens per window. Loss: cross-entropy
of the draft against the greedy tokens, weighted "{s["weighting"]}" (accept: every position up to and
including the first wrong draft, as the acceptance rule rewards it). Base weights frozen;
{draft_log["num_trainable_params"]:,} LoRA parameters; AdamW peak lr {s["lr"]}, {s["warmup"]} warm-up steps, cosine to 10%,
seed {s["seed"]}, fp32, {draft_log["num_threads"]} threads: {draft_log["wall_time_s"] / 60:.1f} min.{_previous_runs(draft_log)}
Mean of the first and last {n} steps: loss {first["loss"]:.3f} -> {last["loss"]:.3f}, accepted length of the
training blocks {first["accepted"]:.2f} -> {last["accepted"]:.2f}. The "no adapter" columns above are the same
checkpoint loaded without `linear_spec_lora/`, in the same run."""


def _stages(log: dict) -> str:
    """One line per training stage, oldest first (a stage may continue the previous one)."""
    stages: list[str] = []
    entry: dict | None = log
    while entry:
        s = entry["settings"]
        stages.append(
            f"- {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens, AdamW peak lr {s['lr']}, "
            f"{s['warmup']} warm-up steps, seed {s['seed']}"
            f"{', continuing the stage above' if s.get('init_from') else ' from scratch'}: "
            f"{entry['wall_time_s'] / 60:.1f} min\n"
        )
        entry = entry.get("previous")
    return "".join(reversed(stages)) + "\n"


@click.command()
@click.argument("checkpoint_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--num-prompts", type=int, default=EvalSettings.num_prompts, show_default=True)
def main(checkpoint_dir: Path, num_prompts: int) -> None:
    """Evaluate CHECKPOINT_DIR and write README.md (the model card) and eval.json into it."""
    ck = load_checkpoint(checkpoint_dir)
    draft_log_path = checkpoint_dir / ADAPTER_DIR / "training_log.json"
    draft_log = json.loads(draft_log_path.read_text()) if draft_log_path.is_file() else None
    against = load_checkpoint(checkpoint_dir, draft_adapter=False) if ck.model.has_draft_adapter else None
    report = evaluate(
        ck, EvalSettings(num_prompts=num_prompts), against, progress=lambda n: click.echo(f"... {n}", err=True)
    )
    report["date"] = datetime.date.today().isoformat()
    machine = (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )  # tokens/s means little under load
    log = json.loads((checkpoint_dir / "training_log.json").read_text())
    spec = json.loads((checkpoint_dir / "config.json").read_text())
    (checkpoint_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (checkpoint_dir / "README.md").write_text(model_card(spec, log, report, machine, draft_log))
    click.echo(f"wrote {checkpoint_dir / 'README.md'}")


if __name__ == "__main__":
    main()
