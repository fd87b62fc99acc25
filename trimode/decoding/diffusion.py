"""Block diffusion with causal context (spec §6), and the denoising loop self-speculation drafts with."""

from __future__ import annotations

import torch

from trimode.decoding.base import Decoder
from trimode.model import Pattern
from trimode.plugins.ops import diffusion_commit


class DiffusionDecoder(Decoder):
    @torch.no_grad()
    def step(self) -> list[list[int]]:
        rows = self.active_rows()
        block = self.denoise(rows, self.new_block(rows), self.settings.commit_threshold,
                             use_draft=False, kind="denoise", stop_at_eos=bool(self.eos_ids))
        new = self._emit_rows(rows, block[:, 1:].tolist())  # the seed was emitted already
        live = torch.tensor([not self.results[r].finish_reason for r in rows.tolist()], device=rows.device)
        if live.any():
            self.refresh(rows[live], block[live])
            for r in rows[live].tolist():
                new[r] += self.emit(r, [int(self.seeds[r])])
        return new

    def new_block(self, rows: torch.Tensor) -> torch.Tensor:
        """[seed, MASK x (L-1)] per row."""
        block = torch.full((len(rows), self.block_length), self.spec.mask_token_id,
                           dtype=torch.long, device=rows.device)
        block[:, 0] = self.seeds[rows]
        return block

    def denoise(self, rows: torch.Tensor, block: torch.Tensor, threshold: float | None,
                use_draft: bool, kind: str, stop_at_eos: bool = False) -> torch.Tensor:
        """Block passes (cache read-only) until no mask is left, at most L of them. With a
        threshold, each pass commits >= 1 token; without, an even split of the masks, remainder first."""
        mask_id, L = self.spec.mask_token_id, self.block_length
        num_masks = (block == mask_id).sum(dim=1)
        for step in range(L):
            pending = (block == mask_id).any(dim=1)
            if stop_at_eos:
                pending &= ~self._eos_settled(block)
            if not pending.any():
                break
            sub = pending.nonzero()[:, 0]
            logits = self.forward(block[sub], rows[sub], Pattern.BLOCK, kind, use_draft=use_draft)
            k = None if threshold is not None else num_masks[sub] // L + (step < num_masks[sub] % L).long()
            block[sub] = diffusion_commit(logits, block[sub], mask_id, threshold, k,
                                          self.settings.temperature, self.sampling_seed())
        return block

    def _eos_settled(self, block: torch.Tensor) -> torch.Tensor:
        """Rows whose block holds a committed EOS with no mask before it."""
        is_eos = torch.zeros_like(block, dtype=torch.bool)
        for e in self.eos_ids:
            is_eos |= block == e
        is_eos[:, 0] = False  # the seed was emitted (and checked) already
        before = torch.cumsum((block == self.spec.mask_token_id).long(), dim=1)
        return (is_eos & (before == 0)).any(dim=1)

    def refresh(self, rows: torch.Tensor, block: torch.Tensor) -> None:
        """Causal pass over the finished block: its K/V enter the cache, its last logit is the next seed."""
        logits = self.forward(block, rows, Pattern.CAUSAL, "refresh",
                              logit_index=torch.full((len(rows),), block.shape[1] - 1, device=rows.device))
        self.cache.advance(rows, block.shape[1])
        self.seeds[rows] = self.pick(logits[:, 0])
