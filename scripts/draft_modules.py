"""Experiment (issue 11): would a draft adapter on more linears than o_proj accept more per cycle?

Continues the checkpoint's draft adapter (o_proj) as `trimode train-draft` does, plus, with
--modules, new rank --rank LoRAs on other linears of every layer (draft rows only, B = 0 at the
start), in the training forward only: the loader, the FP8 export and the engines read o_proj's
adapter alone, so nothing is written but the report. Reports the runtime-path acceptance estimate
(draft_objective.path_acceptance over every offset of held-out greedy continuations, block
--block-length; on the shipped adapter 2.58 where the runtime gives 2.62) before and after.

Run:   .venv/bin/python scripts/draft_modules.py [CHECKPOINT] --modules q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj
         --steps 300 --threads 1 --json out/draft_modules.json      (--modules '' : o_proj alone, the control)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from trimode.checkpoint import load_checkpoint
from trimode.training.draft import (DraftSettings, TargetPool, greedy_sequences, new_optimizer, starting_adapter,
                                    token_stream, train_step, validation_prompts)
from trimode.training.draft_objective import (DraftLoRA, draft_layout, draft_logits, draft_loss, install_lora,
                                              path_acceptance)

OWNERS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp",
          "up_proj": "mlp", "down_proj": "mlp"}


def add_loras(model, modules: list[str], rank: int, generator: torch.Generator) -> list[DraftLoRA]:
    """A new LoRA (PEFT's start: A Kaiming-uniform, B zero, scale 2) on each named linear of every layer."""
    loras = []
    for layer in model.encoder.layers:
        for name in modules:
            owner = getattr(layer, OWNERS[name])
            base = getattr(owner, name)
            fan_in = base.weight.shape[1]
            a = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) / math.sqrt(fan_in)
            loras.append(DraftLoRA(base, a, torch.zeros(base.weight.shape[0], rank), 2.0))
            setattr(owner, name, loras[-1])
    return loras


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
    args = ap.parse_args(argv)
    modules = [m for m in args.modules.split(",") if m]
    if unknown := sorted(set(modules) - set(OWNERS)):
        ap.error(f"--modules: unknown {unknown}; choose from {sorted(OWNERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = DraftSettings(block_lengths=(args.block_length,), steps=args.steps, lr=1e-3, batch_size=8, seed=args.seed,
                      data=args.data, num_eval_prompts=args.num_prompts)
    generator = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    ck = load_checkpoint(args.checkpoint, dtype=torch.float32, draft_adapter=False)
    model, mask_id, L = ck.model, ck.spec.mask_token_id, args.block_length
    start = starting_adapter(ck, s, generator)
    stream, prompts = validation_prompts(ck, token_stream(ck, s.data)[0], s)
    held = greedy_sequences(model, prompts, s.gen_len)
    loras = install_lora(model, start.factors, start.alpha / start.rank) + add_loras(model, modules, args.rank,
                                                                                     generator)
    optim = new_optimizer(loras, s)
    pool = TargetPool(model, stream, s, generator)
    report = {"checkpoint": str(args.checkpoint), "modules": ["o_proj"] + modules, "rank": args.rank,
              "o_proj_rank": start.rank, "steps": s.steps, "block_length": L, "num_prompts": len(prompts),
              "torch": torch.__version__, "num_threads": torch.get_num_threads(),
              "before": path_estimate(model, loras, held, s.prompt_len, L, mask_id)}
    began = time.perf_counter()
    for step in range(s.steps):
        train_step(model, loras, optim, pool.take(s.batch_size), step, L, s, generator)
    report["seconds"] = round(time.perf_counter() - began, 1)
    report["after"] = path_estimate(model, loras, held, s.prompt_len, L, mask_id)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
