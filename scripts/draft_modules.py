"""Experiment (issue 11): does a draft adapter on more linears than o_proj accept more per cycle?

Continues the checkpoint's o_proj draft adapter as `trimode train-draft` does, plus, with
--modules, new LoRAs of rank --rank on other linears of every layer (PEFT's start, B = 0), where
`train-draft --modules` would give them the adapter's own rank. Reports the runtime-path
acceptance estimate (draft_objective.path_acceptance over every offset of held-out greedy
continuations, block --block-length; on the o_proj adapter 2.58 where the runtime gives 2.62)
before and after, on --num-prompts prompts between `trimode eval`'s and (eval_*) on eval's own 16,
the ones the model card reports. --adapter DIR writes the result as a linear_spec_lora/ folder
(o_proj padded to the common rank: the same B @ A), which the loader, FP8 export and
engines take like any other adapter.

Run:   .venv/bin/python scripts/draft_modules.py [CHECKPOINT] --modules q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj
         --rank 128 --steps 600 --threads 1 --json out/draft_modules.json [--adapter out/lora]
       (--modules '' : o_proj alone, the control)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from trimode.checkpoint import Factors, load_checkpoint
from trimode.evaluate import EvalSettings, held_out_prompts, held_out_stream
from trimode.make_checkpoint import write_draft_adapter
from trimode.model import DRAFT_LINEARS
from trimode.training.draft import DraftSettings, grown, new_optimizer, starting_adapter, train_step
from trimode.training.draft_data import TargetPool, greedy_sequences, token_stream, validation_prompts
from trimode.training.draft_objective import (
    draft_layout,
    draft_logits,
    draft_loss,
    init_factors,
    install_lora,
    path_acceptance,
)

OTHERS = [n for n in DRAFT_LINEARS if n != "o_proj"]


def write_adapter(path: Path, factors: Factors, scale: float, log: dict) -> None:
    """The trained LoRAs as a linear_spec_lora/ folder (one scale = alpha / r), with the report;
    o_proj grown to the others' rank (PEFT has one `r`; the loader takes no rank_pattern)."""
    rank = max(a.shape[0] for a, _ in factors.values())
    write_draft_adapter(path, grown(factors, rank, torch.Generator().manual_seed(0)), alpha=scale * rank)
    (path / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


@torch.no_grad()
def path_estimate(model, loras, seqs: torch.Tensor, prompt_len: int, L: int, mask_id: int) -> float:
    starts = torch.arange(prompt_len, seqs.shape[1] - L + 1).expand(seqs.shape[0], -1).contiguous()
    batch = draft_layout(seqs, starts, L, mask_id)
    _, accepted = draft_loss(draft_logits(model, loras, batch), batch.targets, mask_id, "accept")
    path = path_acceptance(starts, accepted, prompt_len)
    return round(sum(path) / len(path), 4)


def main(argv=None) -> int:
    from trimode.cli import EMBEDDED_CHECKPOINT

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, nargs="?", default=EMBEDDED_CHECKPOINT)
    ap.add_argument("--modules", default="q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--data", type=Path, help="text to continue (default: the standard library, as train-draft)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--adapter", type=Path, help="write the trained adapter here (a linear_spec_lora/ folder)")
    args = ap.parse_args(argv)
    modules = [m for m in args.modules.split(",") if m]
    if unknown := sorted(set(modules) - set(OTHERS)):
        ap.error(f"--modules: unknown {unknown}; choose from {OTHERS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = DraftSettings(
        block_lengths=(args.block_length,),
        steps=args.steps,
        lr=1e-3,
        batch_size=8,
        seed=args.seed,
        data=args.data,
        num_eval_prompts=args.num_prompts,
    )
    generator = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    ck = load_checkpoint(args.checkpoint, dtype=torch.float32, draft_adapter=False)
    model, mask_id, L = ck.model, ck.spec.mask_token_id, args.block_length
    start = starting_adapter(ck, s, generator)
    stream, prompts = validation_prompts(ck, token_stream(ck, s.data)[0], s)
    held = greedy_sequences(model, prompts, s.gen_len)
    eval_prompts = held_out_prompts(held_out_stream(ck), EvalSettings.num_prompts, s.prompt_len)
    eval_held = greedy_sequences(model, eval_prompts, s.gen_len)  # the card's prompts (trimode eval's)
    scale = start.alpha / start.rank  # the new LoRAs take the o_proj adapter's (2 on the embedded checkpoint)
    factors = start.factors | init_factors(model, args.rank, generator, modules)  # new: PEFT's zero-delta start
    loras = install_lora(model, factors, scale)
    optim = new_optimizer(loras, s)
    pool = TargetPool(model, stream, s, generator)
    report = {
        "checkpoint": str(args.checkpoint),
        "modules": ["o_proj"] + modules,
        "rank": args.rank,
        "o_proj_rank": start.rank,
        "steps": s.steps,
        "block_length": L,
        "num_prompts": len(prompts),
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "before": path_estimate(model, loras, held, s.prompt_len, L, mask_id),
        "eval_before": path_estimate(model, loras, eval_held, s.prompt_len, L, mask_id),
    }
    began = time.perf_counter()
    for step in range(s.steps):
        train_step(model, loras, optim, pool.take(s.batch_size), step, L, False, s, generator)  # linear rows
    report["seconds"] = round(time.perf_counter() - began, 1)
    report["after"] = path_estimate(model, loras, held, s.prompt_len, L, mask_id)
    report["eval_after"] = path_estimate(model, loras, eval_held, s.prompt_len, L, mask_id)
    if args.adapter:
        write_adapter(
            args.adapter, {key: (lo.a.detach(), lo.b.detach()) for key, lo in zip(factors, loras)}, scale, report
        )
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
