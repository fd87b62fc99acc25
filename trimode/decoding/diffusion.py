"""Block diffusion with causal context (spec §6), and `denoise`, which self-speculation drafts with."""

from __future__ import annotations

import torch

from trimode.decoding.batch import Batch
from trimode.decoding.settings import DecodeConfig
from trimode.passes import PassKind


class DiffusionPolicy:
    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        block = denoise(batch, new_block(batch), config.commit_threshold, PassKind.DENOISE, stop_at_eos=True)
        new = [seq.emit(row[1:]) for seq, row in zip(batch.seqs, batch.fetch(block)[0])]  # the seed is out already
        live = [i for i, seq in enumerate(batch.seqs) if not seq.finish_reason]
        if live:
            sub = batch.subset(live)
            for i, seq, t in zip(live, sub.seqs, sub.fetch(self.refresh(sub, block[live]))[0]):
                seq.next_token = t
                new[i] += seq.emit([t])
        return new

    def refresh(self, batch: Batch, block: torch.Tensor) -> torch.Tensor:
        """Causal pass over the finished block: its K/V enter the cache, its last logit is the next seed."""
        out = batch.run(PassKind.REFRESH, block)
        batch.advance([block.shape[1]] * len(batch))
        return batch.pick(out)[:, 0]


def new_block(batch: Batch) -> torch.Tensor:
    """[next token, MASK x (L-1)] per sequence."""
    block = torch.full(
        (len(batch), batch.block_length), batch.spec.mask_token_id, dtype=torch.long, device=batch.device
    )
    block[:, 0] = batch.next_tokens()
    return block


def denoise(
    batch: Batch, block: torch.Tensor, threshold: float | None, kind: PassKind, stop_at_eos: bool = False
) -> torch.Tensor:
    """Block passes (cache read-only) until no mask is left, at most L of them. With a threshold,
    each pass commits >= 1 token (threshold 0: all of them, in one pass); without, an even split
    of the masks, remainder first. With stop_at_eos, a sequence stops once it has committed an EOS
    with no mask before it."""
    mask_id, length = batch.spec.mask_token_id, block.shape[1]
    num_masks = length - 1  # every block starts as [seed, MASK x (L-1)]
    eos = batch.eos_table() if stop_at_eos else None
    index = list(range(len(batch)))
    for step in range(num_masks):
        if step > 0:  # pass 0 always runs for every sequence: nothing is committed yet
            if threshold == 0:
                break
            pending = (block == mask_id).any(dim=1)
            if eos is not None:
                pending &= ~_eos_settled(block, eos, mask_id)
            index = pending.nonzero()[:, 0].tolist()  # the host sync each further pass needs
            if not index:
                break
        sub = batch.subset(index)
        out = sub.run(kind, block[index])
        k = (
            None
            if threshold is not None
            else torch.full((len(index),), num_masks // length + int(step < num_masks % length), device=block.device)
        )
        block[index] = sub.commit(out, block[index], threshold, k)
    return block


def _eos_settled(block: torch.Tensor, eos: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Rows whose block holds a committed end token (eos [b, E], -1 = none) with no mask before it."""
    is_eos = (block[:, :, None] == eos[:, None, :]).any(dim=2)
    is_eos[:, 0] = False  # the seed was emitted (and checked) already
    before = torch.cumsum((block == mask_id).long(), dim=1)
    return (is_eos & (before == 0)).any(dim=1)
