"""Linear self-speculation (spec §7): draft a block by diffusion, verify it causally, accept a prefix."""

from __future__ import annotations

import torch

from trimode.decoding.diffusion import DiffusionDecoder
from trimode.model import Pattern
from trimode.plugins.ops import spec_accept


class SelfSpecDecoder(DiffusionDecoder):
    @torch.no_grad()
    def step(self) -> list[list[int]]:
        rows = self.active_rows()
        block = self.draft(rows)
        logits = self.verify(rows, block)
        tokens, n = self.accept(rows, block, logits)
        emitted = []
        for j, r in enumerate(rows.tolist()):
            self.results[r].stats.accepted_lengths.append(int(n[j]))
            emitted.append(tokens[j, :n[j]].tolist())
        return self._emit_rows(rows, emitted)

    def draft(self, rows: torch.Tensor) -> torch.Tensor:
        """Block pass(es) over [s, MASK x (L-1)] with the draft adapter on; default: one pass fills all."""
        return self.denoise(rows, self.new_block(rows), self.settings.commit_threshold,
                            use_draft=True, kind="draft")

    def verify(self, rows: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """Causal pass over [s, d1 .. d(L-1)], adapter off, writing K/V for all L positions."""
        return self.forward(block, rows, Pattern.CAUSAL, "verify")

    def accept(self, rows: torch.Tensor, block: torch.Tensor,
               logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep n = matched drafts + 1 bonus token: the cache keeps s, d1 .. d(n-1); a_(n-1) is the next seed.
        At temperature 0 every emitted token is the AR greedy token: the invariant of spec §7."""
        accepted = spec_accept(logits, block, self.spec.mask_token_id, self.eos_tensor,
                               self.settings.temperature, self.sampling_seed())
        self.cache.advance(rows, accepted.n)
        self.seeds[rows] = accepted.next_seed
        return accepted.tokens, accepted.n
