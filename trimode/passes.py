"""Generation modes and the kinds of forward pass the three modes run (spec §5-§7): one name for one concept.

A `PassKind` fixes the attention pattern, whether the draft adapter is on and which logits the
caller needs. It is the key compiled engines are built per, the label statistics count, and what
FP8 calibration iterates over (`MODE_PASSES`, the passes each mode runs, written once here).
"""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """A generation mode; its values are the CLI choices."""

    AR = "ar"
    DIFFUSION = "diffusion"
    SELF_SPEC = "self-spec"


class Pattern(str, Enum):
    CAUSAL = "causal"  # token i sees the prefix and chunk tokens 0..i; logit i predicts position i+1
    BLOCK = "block"  # every token sees the prefix and the whole chunk; logit i predicts position i


class PassKind(str, Enum):
    PREFILL = "prefill"  # causal chunk of a prompt; only the last prompt token's logit is needed
    DECODE = "decode"  # AR: causal pass over one token
    DENOISE = "denoise"  # diffusion: block pass over a partly masked block, cache read-only
    DRAFT = "draft"  # self-spec: the same block pass with the draft adapter on
    VERIFY = "verify"  # self-spec: causal pass over a drafted block, every logit
    REFRESH = "refresh"  # diffusion: causal pass over a finished block; only its last logit

    @property
    def pattern(self) -> Pattern:
        return Pattern.BLOCK if self in (PassKind.DENOISE, PassKind.DRAFT) else Pattern.CAUSAL

    @property
    def use_draft(self) -> bool:
        """The draft adapter (spec §2) is on in the self-spec draft pass only."""
        return self is PassKind.DRAFT

    @property
    def last_logit_only(self) -> bool:
        """Prefill and refresh need one logit per sequence: the one that gives the next token."""
        return self in (PassKind.PREFILL, PassKind.REFRESH)


MODE_PASSES: dict[Mode, tuple[PassKind, ...]] = {
    Mode.AR: (PassKind.PREFILL, PassKind.DECODE),
    Mode.DIFFUSION: (PassKind.PREFILL, PassKind.DENOISE, PassKind.REFRESH),
    Mode.SELF_SPEC: (PassKind.PREFILL, PassKind.DRAFT, PassKind.VERIFY),
}
