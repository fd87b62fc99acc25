"""Linear self-speculation (spec §7): draft a block by diffusion, verify it causally, accept a prefix."""

from __future__ import annotations

import torch

from trimode.decoding.batch import Batch
from trimode.decoding.diffusion import denoise, new_block
from trimode.decoding.runner import PassOutput
from trimode.decoding.settings import DecodeConfig
from trimode.passes import PassKind


class SelfSpecPolicy:
    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        block = self.draft(batch, config)
        tokens, accepted, logprobs = self.accept(batch, block, self.verify(batch, block))
        new = []
        for seq, a, n, lp in zip(batch.seqs, tokens, accepted, logprobs):
            seq.stats.accepted_lengths.append(n)
            seq.next_token = a[n - 1]
            new.append(seq.emit(a[:n], lp))
        return new

    def draft(self, batch: Batch, config: DecodeConfig) -> torch.Tensor:
        """Block pass(es) over [s, MASK x (L-1)] with the draft adapter on; default: one pass fills all."""
        return denoise(batch, new_block(batch), config.commit_threshold, PassKind.DRAFT)[0]

    def verify(self, batch: Batch, block: torch.Tensor) -> PassOutput:
        """Causal pass over [s, d1 .. d(L-1)], adapter off, writing K/V for all L positions."""
        return batch.run(PassKind.VERIFY, block)

    def accept(self, batch: Batch, block: torch.Tensor, out: PassOutput) -> tuple[list, list[int], list]:
        """Keep n = matched drafts + 1 bonus token: the cache keeps s, d1 .. d(n-1); a_(n-1) is the next seed.
        At temperature 0 every emitted token is the AR greedy token: the invariant of spec §7.
        -> each row's verify tokens a_0 .. a_(L-1), n, and their log probs (verify logits: as AR's)."""
        result = batch.accept(out, block)
        logprobs = batch.logprobs(out, result.tokens)
        tokens, accepted, host_logprobs = batch.fetch(result.tokens, result.n, logprobs)  # the step's one host sync
        batch.advance(accepted)
        return tokens, accepted, host_logprobs
