"""Generation modes and the kinds of forward pass the three modes run (spec §5-§7): one name for one concept.

A `PassKind` fixes the attention pattern, whether the draft adapter is on and which logits the
caller needs. It is the key compiled engines are built per, the label statistics count, and what
FP8 calibration iterates over (`MODE_PASSES`, the passes each mode runs, written once here).
"""

from __future__ import annotations

import math
from enum import Enum


class Mode(str, Enum):
    """A generation mode; its values are the CLI choices."""

    AR = "ar"
    DIFFUSION = "diffusion"
    SELF_SPEC = "self-spec"
    QUADRATIC = "quadratic"  # self-speculation with one pass per cycle (../shared/spec/quadratic.md)
    AUTO = "auto"  # per step the fastest of ar, self-spec and quadratic (decoding/auto.py): AR's tokens at T = 0


class Pattern(str, Enum):
    CAUSAL = "causal"  # token i sees the prefix and chunk tokens 0..i; logit i predicts position i+1
    BLOCK = "block"  # every token sees the prefix and the whole chunk; logit i predicts position i
    # W(W+1) tokens: a causal verify chain of W, then W rows of W masks (reference.quadratic_visibility)
    QUADRATIC = "quadratic"


class PassKind(str, Enum):
    PREFILL = "prefill"  # causal chunk of a prompt; only the last prompt token's logit is needed
    DECODE = "decode"  # AR: causal pass over one token
    DENOISE = "denoise"  # diffusion: block pass over a partly masked block, cache read-only
    DRAFT = "draft"  # self-spec: the same block pass with the draft adapter on
    VERIFY = "verify"  # self-spec: causal pass over a drafted block, every logit
    REFRESH = "refresh"  # diffusion: causal pass over a finished block; only its last logit
    QUADRATIC = "quadratic"  # quadratic self-spec: verify the drafts and draft the next block, one pass

    @property
    def pattern(self) -> Pattern:
        if self is PassKind.QUADRATIC:
            return Pattern.QUADRATIC
        return Pattern.BLOCK if self in (PassKind.DENOISE, PassKind.DRAFT) else Pattern.CAUSAL

    @property
    def use_draft(self) -> bool:
        """The draft adapter (spec §2) is on for every row of the self-spec draft pass (and for the
        mask rows of a quadratic pass: draft_rows)."""
        return self is PassKind.DRAFT

    def row_width(self, chunk_len: int) -> int:
        """A quadratic pass's block length W (its chunk: W(W+1) tokens); 0 for the other kinds."""
        return quadratic_width(chunk_len) if self is PassKind.QUADRATIC else 0

    def draft_rows(self, chunk_len: int) -> bool | slice:
        """Which rows of a chunk run with the draft adapter: all (True) in a draft pass, the mask rows
        (a slice from W) in a quadratic pass, none (False) otherwise."""
        if self is PassKind.QUADRATIC:
            return slice(self.row_width(chunk_len), None)
        return self.use_draft

    @property
    def last_logit_only(self) -> bool:
        """Prefill and refresh need one logit per sequence: the one that gives the next token."""
        return self in (PassKind.PREFILL, PassKind.REFRESH)


MODE_PASSES: dict[Mode, tuple[PassKind, ...]] = {
    Mode.AR: (PassKind.PREFILL, PassKind.DECODE),
    Mode.DIFFUSION: (PassKind.PREFILL, PassKind.DENOISE, PassKind.REFRESH),
    Mode.SELF_SPEC: (PassKind.PREFILL, PassKind.DRAFT, PassKind.VERIFY),
    Mode.QUADRATIC: (PassKind.PREFILL, PassKind.QUADRATIC),
    Mode.AUTO: (PassKind.PREFILL, PassKind.DECODE, PassKind.DRAFT, PassKind.VERIFY, PassKind.QUADRATIC),
}


def quadratic_chunk(width: int) -> int:
    """Tokens of a quadratic pass over blocks of `width`: the verify chain and one row of masks per token."""
    return width * (width + 1)


def quadratic_width(chunk_len: int) -> int:
    """The block length W of a quadratic chunk of W(W+1) tokens (W^2 <= W(W+1) < (W+1)^2)."""
    width = math.isqrt(chunk_len)
    assert quadratic_chunk(width) == chunk_len, f"{chunk_len} tokens is no quadratic chunk"
    return width


def cycle_positions(mode: Mode, block_length: int) -> int:
    """Cache positions past a sequence's length that one cycle of its mode writes: a token (AR), a
    block, or a quadratic chunk (its masks' K/V are the pass's scratch)."""
    if mode in (Mode.QUADRATIC, Mode.AUTO):
        return quadratic_chunk(block_length)
    return 1 if mode is Mode.AR else block_length
