"""Settings in small frozen sections, validated once; errors name the field and the value.

- `SamplingParams`: per request (each `Sequence` has its own): length, temperature, seed, stops,
  log probs.
- `DecodeConfig`: the shape of the work a mode does (mode, block length, commit threshold); what
  compiled engines are built for, so requests with the same one are batched together.
- `EngineConfig`: the engine's pool and prefill chunk.
- `GenerationSettings`: all of one `generate()` call in one flat object (the CLI's options).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trimode.decoding.logprobs import MAX_LOGPROBS
from trimode.errors import ConfigError, InputError
from trimode.kv_cache import blocks_per_seq
from trimode.passes import Mode

DEFAULT_THRESHOLD = {Mode.DIFFUSION: 0.9, Mode.SELF_SPEC: 0.0, Mode.AUTO: 0.0}  # spec §6 and §7 (auto: its self-spec)
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0  # keys this sequence's own random stream (temperature > 0)
    stop_token_ids: tuple[int, ...] = ()  # extra end tokens besides the checkpoint's EOS ids
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    logprobs: int | None = None  # None: none; 0: each emitted token's log prob; k: also the top k (logprobs.py)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            "max_new_tokens",
            "an integer >= 1",
            self.max_new_tokens,
        )
        _check(
            self.temperature >= 0 and self.temperature != float("inf"),
            "temperature",
            "a finite number >= 0",
            self.temperature,
        )
        _check(
            isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED, "seed", f"an integer in 0..{MAX_SEED}", self.seed
        )
        _check(
            self.logprobs is None
            or isinstance(self.logprobs, int)
            and not isinstance(self.logprobs, bool)
            and 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"None or an integer in 0..{MAX_LOGPROBS}",
            self.logprobs,
        )
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


@dataclass(frozen=True)
class DecodeConfig:
    mode: Mode = Mode.AR
    block_length: int | None = None  # None: the checkpoint's block_size
    threshold: float | None = None  # None: the mode's default; see `commit_threshold`
    use_top_k_schedule: bool = False  # diffusion only: commit an even split per step instead

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise InputError(f"mode: expected one of {', '.join(m.value for m in Mode)}, got {self.mode!r}") from None
        _check(
            self.block_length is None or self.block_length >= 1, "block_length", "an integer >= 1", self.block_length
        )
        _check(self.threshold is None or 0 <= self.threshold <= 1, "threshold", "a number in [0, 1]", self.threshold)

    @property
    def commit_threshold(self) -> float | None:
        """The threshold of the commit rule; None selects the top-k schedule (diffusion)."""
        if self.use_top_k_schedule:
            return None
        return DEFAULT_THRESHOLD.get(self.mode) if self.threshold is None else self.threshold


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # sequences in flight at once (Triton's max_batch_size)
    max_seq_len: int = 4096  # the longest sequence: prompt + generated tokens (+ one block)
    prefill_chunk: int | None = None  # None: a prompt is prefilled in one pass
    kv_block_size: int = 16  # positions per KV block (max_seq_len: a dense slot per sequence)
    num_kv_blocks: int | None = None  # the pool; None: max_slots sequences of max_seq_len (kv_cache.py)
    enable_prefix_caching: bool = True  # share full blocks of equal prefixes between requests (blocks.py)
    async_steps: bool | None = None  # AR ahead of the host (ar.py); None: TRIMODE_ASYNC_STEPS, else CUDA

    def __post_init__(self) -> None:
        _check(self.max_slots >= 1, "max_slots", "an integer >= 1", self.max_slots)
        _check(self.max_seq_len >= 2, "max_seq_len", "an integer >= 2", self.max_seq_len)
        _check(self.kv_block_size >= 1, "kv_block_size", "an integer >= 1", self.kv_block_size)
        need = blocks_per_seq(self.max_seq_len, self.block_size)
        _check(
            self.num_kv_blocks is None or self.num_kv_blocks >= need,
            "num_kv_blocks",
            f"at least the {need} blocks of one max_seq_len sequence",
            self.num_kv_blocks,
        )
        _check(
            self.prefill_chunk is None or self.prefill_chunk >= 1,
            "prefill_chunk",
            "an integer >= 1",
            self.prefill_chunk,
        )

    @property
    def block_size(self) -> int:
        """kv_block_size, at most max_seq_len (a larger block is one dense slot)."""
        return min(self.kv_block_size, self.max_seq_len)


@dataclass(frozen=True)
class GenerationSettings:
    """One `generate()` call: every prompt gets the same sampling parameters and decode config."""

    mode: Mode = Mode.AR
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    block_length: int | None = None
    threshold: float | None = None
    use_top_k_schedule: bool = False
    prefill_chunk: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", self.decoding.mode)  # validates the decode section
        self.sampling  # noqa: B018 (validates the sampling section)
        _check(
            self.prefill_chunk is None or self.prefill_chunk >= 1,
            "prefill_chunk",
            "an integer >= 1",
            self.prefill_chunk,
        )

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            self.max_new_tokens, self.temperature, self.seed, self.stop_token_ids, self.ignore_eos, self.logprobs
        )

    @property
    def decoding(self) -> DecodeConfig:
        return DecodeConfig(self.mode, self.block_length, self.threshold, self.use_top_k_schedule)

    @property
    def commit_threshold(self) -> float | None:
        return self.decoding.commit_threshold


def _check(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise InputError(f"{field}: expected {expected}, got {value!r}")


SWITCHES = ("TRIMODE_ASYNC_STEPS", "TRIMODE_PASS_GRAPHS", "TRIMODE_SEND_THREAD")  # the on/off ones trimode reads


def check_switches() -> None:
    """Refuse a bad value of any switch now (`trimode serve`, before the server starts: in the
    engine model it would stop the model's load deep in the server's log)."""
    for name in SWITCHES:
        env_switch(name, False)


def env_switch(name: str, default: bool) -> bool:
    """An on/off setting from the environment: 1 or 0, unset = default; anything else is refused."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ConfigError(f"{name}={value!r}: expected 1 (on) or 0 (off)")
    return default if value == "" else value == "1"
