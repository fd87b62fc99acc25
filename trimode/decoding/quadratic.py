"""Quadratic self-speculation (../shared/spec/quadratic.md): one pass per cycle verifies the current
drafts and drafts the next block for every possible acceptance.

Between cycles a sequence holds its next token s (emitted, not cached) and drafts d_1 .. d_(W-1)
(after prefill: none, read as MASK, so the first cycle accepts 1). The pass runs the chunk
[s, d_1 .. d_(W-1) | row 0 masks | .. | row W-1 masks] (model.forward's quadratic layout): the
verify chain is causal and adapter-off, so its logits are AR's; row i's W masks see t_0 .. t_i and
their own row, with the adapter on. Accept as linear self-spec (spec §7); the next drafts are the
picks of row n-1's masks at columns 2 .. W (column 1 predicts the bonus position: the verifier's
a_(n-1) is used there). The cache keeps t_0 .. t_(n-1), as a verify pass's; the rest is scratch.
"""

from __future__ import annotations

import torch

from trimode.decoding.batch import Batch
from trimode.decoding.runner import PassOutput
from trimode.decoding.settings import DecodeConfig
from trimode.passes import PassKind
from trimode.plugins.reference import greedy_tokens, quadratic_tokens
from trimode.transfer import to_device


class QuadraticPolicy:
    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        width = batch.seqs[0].block_length
        chain = self.chain(batch, width)
        out = batch.run(PassKind.QUADRATIC, quadratic_tokens(chain, batch.spec.mask_token_id))
        tokens, accepted, logprobs, drafts = self.accept(batch, chain, out, width)
        new = []
        for seq, a, n, lp, d in zip(batch.seqs, tokens, accepted, logprobs, drafts):
            seq.stats.accepted_lengths.append(n)
            seq.next_token, seq.drafts = a[n - 1], d
            new.append(seq.emit(a[:n], lp))
        return new

    def chain(self, batch: Batch, width: int) -> torch.Tensor:
        """[b, W] the verify chain [s, d_1 .. d_(W-1)] (no drafts yet: MASK, which never matches)."""
        mask = batch.spec.mask_token_id
        rows = [[s.next_token, *(s.drafts or [mask] * (width - 1))] for s in batch.seqs]
        return to_device(rows, batch.device)

    def accept(
        self, batch: Batch, chain: torch.Tensor, out: PassOutput, width: int
    ) -> tuple[list, list[int], list, list]:
        """Accept n as linear self-spec over the chain's causal logits; the next drafts come from row
        n-1's masks. -> each row's verify tokens, n, their log probs and the next drafts (host)."""
        verify = PassOutput(out.logits[:, :width], None if out.picks is None else out.picks[:, :width], out.is_finite)
        result = batch.accept(verify, chain)
        logprobs = batch.logprobs(verify, result.tokens)
        drafts = self.next_drafts(batch, out, result.n, width)
        tokens, accepted, host_logprobs, host_drafts = batch.fetch(result.tokens, result.n, logprobs, drafts)
        batch.advance(accepted)  # the cache keeps the chain's first n tokens
        return tokens, accepted, host_logprobs, host_drafts

    def next_drafts(self, batch: Batch, out: PassOutput, n: torch.Tensor, width: int) -> torch.Tensor:
        """[b, W-1] the greedy picks of row n-1's masks at columns 2 .. W (positions p+n+1 ..).
        Greedy at every temperature: a draft only decides what the verifier checks, never what it emits."""
        mask = batch.spec.mask_token_id
        picks = out.picks[:, width:] if out.picks is not None else greedy_tokens(out.logits[:, width:], mask)
        rows = picks.view(len(batch), width, width)
        return rows[torch.arange(len(batch), device=n.device), n - 1, 1:]
