"""Autoregressive decoding (spec §5): one causal pass per token."""

from __future__ import annotations

import torch

from trimode.decoding.base import Decoder
from trimode.model import Pattern


class ARDecoder(Decoder):
    @torch.no_grad()
    def step(self) -> list[list[int]]:
        rows = self.active_rows()
        logits = self.decode(rows)
        self.seeds[rows] = self.pick(logits[:, 0])
        return self._emit_rows(rows, [[t] for t in self.seeds[rows].tolist()])

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Causal pass over each row's newest token: it enters the cache, its logit is the next one."""
        logits = self.forward(self.seeds[rows, None], rows, Pattern.CAUSAL, "decode")
        self.cache.advance(rows, 1)
        return logits
