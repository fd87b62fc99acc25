"""Generation settings: one frozen section, validated once, errors name the field and value."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from trimode.errors import InputError


class Mode(str, Enum):
    AR = "ar"
    DIFFUSION = "diffusion"
    SELF_SPEC = "self-spec"


DEFAULT_THRESHOLD = {Mode.DIFFUSION: 0.9, Mode.SELF_SPEC: 0.0}  # spec §6 and §7


@dataclass(frozen=True)
class GenerationSettings:
    mode: Mode = Mode.AR
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    block_length: int | None = None       # None: the checkpoint's block_size
    threshold: float | None = None        # None: the mode's default; see `commit_threshold`
    use_top_k_schedule: bool = False     # diffusion only: commit an even split per step instead
    prefill_chunk: int | None = None      # None: one-shot prefill
    ignore_eos: bool = False              # benchmarks: always generate max_new_tokens
    stop_token_ids: tuple[int, ...] = ()  # extra end tokens besides the checkpoint's EOS ids

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise InputError(f"mode: expected one of {', '.join(m.value for m in Mode)}, got {self.mode!r}") from None
        _check(self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1", self.max_new_tokens)
        _check(self.temperature >= 0, "temperature", "a number >= 0", self.temperature)
        _check(self.block_length is None or self.block_length >= 1, "block_length", "an integer >= 1",
               self.block_length)
        _check(self.threshold is None or 0 <= self.threshold <= 1, "threshold", "a number in [0, 1]",
               self.threshold)
        _check(self.prefill_chunk is None or self.prefill_chunk >= 1, "prefill_chunk", "an integer >= 1",
               self.prefill_chunk)

    @property
    def commit_threshold(self) -> float | None:
        """The threshold of the commit rule; None selects the top-k schedule (diffusion)."""
        if self.use_top_k_schedule:
            return None
        return DEFAULT_THRESHOLD.get(self.mode) if self.threshold is None else self.threshold


def _check(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise InputError(f"{field}: expected {expected}, got {value!r}")
