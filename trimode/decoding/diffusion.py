"""Block diffusion with causal context (spec §6), and `denoise`, which self-speculation drafts with."""

from __future__ import annotations

import torch

from trimode.decoding.batch import Batch
from trimode.decoding.logprobs import LogProbs, empty_logprobs, token_logprobs
from trimode.decoding.settings import DecodeConfig
from trimode.passes import PassKind


class DiffusionPolicy:
    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        block, logprobs = denoise(
            batch, new_block(batch), config.commit_threshold, PassKind.DENOISE, stop_at_eos=True, with_logprobs=True
        )
        rows, row_logprobs = batch.fetch(block, logprobs)
        new = [  # the seed is out already
            seq.emit(row[1:], lp and lp[1:]) for seq, row, lp in zip(batch.seqs, rows, row_logprobs)
        ]
        live = [i for i, seq in enumerate(batch.seqs) if not seq.finish_reason]
        if live:
            sub = batch.subset(live)
            seeds, seed_logprobs = sub.fetch(*self.refresh(sub, block[live]))
            for i, seq, t, lp in zip(live, sub.seqs, seeds, seed_logprobs):
                seq.next_token = t
                new[i] += seq.emit([t], lp)
        return new

    def refresh(self, batch: Batch, block: torch.Tensor) -> tuple[torch.Tensor, LogProbs | None]:
        """Causal pass over the finished block: its K/V enter the cache, its last logit is the next
        seed [b] (-> with its log probs)."""
        out = batch.run(PassKind.REFRESH, block)
        batch.advance([block.shape[1]] * len(batch))
        picks = batch.pick(out)
        return picks[:, 0], batch.logprobs(out, picks)


def new_block(batch: Batch) -> torch.Tensor:
    """[next token, MASK x (L-1)] per sequence."""
    block = torch.full(
        (len(batch), batch.block_length), batch.spec.mask_token_id, dtype=torch.long, device=batch.device
    )
    block[:, 0] = batch.next_tokens()
    return block


def denoise(
    batch: Batch,
    block: torch.Tensor,
    threshold: float | None,
    kind: PassKind,
    stop_at_eos: bool = False,
    with_logprobs: bool = False,
) -> tuple[torch.Tensor, LogProbs | None]:
    """Block passes (cache read-only) until no mask is left, at most L of them. With a threshold,
    each pass commits >= 1 token (threshold 0: all of them, in one pass); without, an even split
    of the masks, remainder first. With stop_at_eos, a sequence stops once it has committed an EOS
    with no mask before it. -> the block, and with_logprobs (if a sequence asked) each committed
    token's log probs under the pass that committed it (the seed's: placeholders)."""
    mask_id, length = batch.spec.mask_token_id, block.shape[1]
    num_masks = length - 1  # every block starts as [seed, MASK x (L-1)]
    eos = batch.eos_table() if stop_at_eos else None
    num_top = batch.num_top_logprobs if with_logprobs else None
    logprobs = None if num_top is None else empty_logprobs(block.shape, num_top, block.device)
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
        every = len(index) == len(batch)  # every row (always the first pass): no gather, no scatter
        sub, before = (batch, block) if every else (batch.subset(index), block[index])
        out = sub.run(kind, before)
        k = (
            None
            if threshold is not None
            else torch.full((len(index),), num_masks // length + int(step < num_masks % length), device=block.device)
        )
        after = sub.commit(out, before, threshold, k)
        if every:
            block = after
        else:
            block[index] = after
        if logprobs is not None:  # committed here: a mask before, a token after (the mask is never picked)
            this_pass = token_logprobs(out.logits, after, logprobs.num_top, mask_id)
            logprobs.set_rows(index, logprobs.rows(index).where(after != before, this_pass))
    return block, logprobs


def _eos_settled(block: torch.Tensor, eos: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Rows whose block holds a committed end token (eos [b, E], -1 = none) with no mask before it."""
    is_eos = (block[:, :, None] == eos[:, None, :]).any(dim=2)
    is_eos[:, 0] = False  # the seed was emitted (and checked) already
    before = torch.cumsum((block == mask_id).long(), dim=1)
    return (is_eos & (before == 0)).any(dim=1)
