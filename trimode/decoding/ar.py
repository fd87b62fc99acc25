"""Autoregressive decoding (spec §5): one causal pass per token."""

from __future__ import annotations

from trimode.decoding.batch import Batch
from trimode.decoding.settings import DecodeConfig
from trimode.passes import PassKind


class ARPolicy:
    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        out = self.decode(batch)
        picks = batch.pick(out)
        tokens, logprobs = batch.fetch(picks[:, 0], batch.logprobs(out, picks))  # the step's one host sync
        for seq, t in zip(batch.seqs, tokens):
            seq.next_token = t
        return [seq.emit([t], lp) for seq, t, lp in zip(batch.seqs, tokens, logprobs)]

    def decode(self, batch: Batch):
        """Causal pass over each sequence's newest token: it enters the cache, its logit is the next one."""
        out = batch.run(PassKind.DECODE, batch.next_tokens()[:, None])
        batch.advance([1] * len(batch))
        return out
