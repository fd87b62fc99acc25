"""One request's state, from arrival to its last token (nano-vllm's Sequence).

A sequence owns its prompt, its emitted tokens, its slot and KV blocks while it runs, its next token
(the newest token, emitted but not yet in the cache: the cache holds prompt + tokens[:-1]), its statistics, its own sampling parameters and
its own random stream, so what it generates never depends on which requests share its batch.
With params.logprobs set it also keeps each emitted token's log prob (and top-k), parallel to tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from trimode.decoding.blocks import BlockState
from trimode.decoding.logprobs import TokenLogProb
from trimode.decoding.settings import DecodeConfig, SamplingParams
from trimode.passes import Mode

_MASK64 = (1 << 64) - 1


class Status(str, Enum):
    WAITING = "waiting"  # queued (or preempted): no slot, no blocks
    PREFILL = "prefill"  # holds a slot; prompt chunks still to run
    RUNNING = "running"  # prompt cached, first token emitted: mode cycles run
    FINISHED = "finished"  # EOS, length or aborted; slot released


@dataclass
class SequenceStats:
    num_generated: int = 0
    passes: Counter = field(default_factory=Counter)  # by PassKind value
    accepted_lengths: list[int] = field(default_factory=list)  # self-speculation, per cycle
    num_preemptions: int = 0  # times its blocks were taken back and its prefix recomputed
    num_cached_tokens: int = 0  # prefill tokens found in the prefix cache instead of computed
    auto_cycles: Counter = field(default_factory=Counter)  # mode auto: the cycles run of each choice, by name

    @property
    def num_passes(self) -> int:
        return sum(self.passes.values())

    @property
    def tokens_per_pass(self) -> float:
        """Every pass counted, prefill included: AR is exactly 1.0 with a one-shot prefill."""
        return self.num_generated / max(self.num_passes, 1)

    @property
    def mean_accepted_length(self) -> float | None:
        a = self.accepted_lengths
        return sum(a) / len(a) if a else None

    def to_dict(self) -> dict:
        return {
            "num_generated": self.num_generated,
            "passes": {str(k): v for k, v in self.passes.items()},
            "num_passes": self.num_passes,
            "tokens_per_pass": round(self.tokens_per_pass, 4),
            "accepted_lengths": list(self.accepted_lengths),
            "mean_accepted_length": self.mean_accepted_length,
            **({"auto_cycles": dict(self.auto_cycles)} if self.auto_cycles else {}),
        }


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    decoding: DecodeConfig
    block_length: int  # resolved: decoding.block_length or the engine's default; auto: the width it ran last
    eos_ids: frozenset[int]  # the checkpoint's EOS ids and params.stop_token_ids
    status: Status = Status.WAITING
    slot: int | None = None
    num_prefilled: int = 0  # prefill_tokens in the cache so far
    kv: BlockState = field(default_factory=BlockState)  # its KV blocks (blocks.py)
    next_token: int | None = None  # emitted, not yet cached: the next pass's first token
    drafts: list[int] | None = None  # quadratic self-spec: the next cycle's drafts (None: not drafted yet)
    widths: tuple[int, ...] = ()  # auto: the block lengths it may run (one where the request named it)
    acceptance: dict = field(default_factory=dict)  # auto: running mean tokens per cycle, by choice (auto.py)
    auto_choice: tuple[Mode, int] | None = None  # auto: what its next cycle runs, chosen before its blocks grow
    pending: tuple | None = None  # async AR (ar.py): (InFlight, row), its next token, picked, not on the host yet
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # params.logprobs set: one per token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # params.logprobs >= 1: one per token
    finish_reason: str | None = None  # "eos", "length" or "abort"
    stats: SequenceStats = field(default_factory=SequenceStats)
    num_draws: int = 0  # sampling ops this sequence has taken part in

    @property
    def held_slot(self) -> int:
        """slot, of a sequence that holds one (prefilling or running: what the engine batches)."""
        assert self.slot is not None, f"sequence {self.id} holds no slot"
        return self.slot

    @property
    def prefill_tokens(self) -> list[int]:
        """What a prefill puts in the cache: the prompt, or after a preemption the prompt and every
        emitted token but the newest (which stays next_token): the cache it had, so it goes on unchanged."""
        return self.prompt + self.tokens[:-1] if self.tokens else self.prompt

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def room(self) -> int:
        """Tokens it may still emit: max_new_tokens less those it has."""
        return self.params.max_new_tokens - len(self.tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, tokens: list[int], logprobs: list[TokenLogProb] | None = None) -> list[int]:
        """Append tokens, truncated at the first EOS (kept) and at max_new_tokens; -> what was appended.
        logprobs: one per token (Batch.fetch of a LogProbs); None only when nothing was asked."""
        if self.finish_reason:
            return []
        room = self.room
        out = tokens[:room]
        eos = next((i for i, t in enumerate(out) if t in self.eos_ids), None)
        if eos is not None:
            out, self.finish_reason = out[: eos + 1], "eos"
        elif len(out) == room:
            self.finish_reason = "length"
        self.tokens += out
        self.stats.num_generated += len(out)
        if self.params.logprobs is not None:
            assert logprobs is not None and len(logprobs) >= len(out), "log probs were asked: one per token"
            self.logprobs += [lp for lp, _ in logprobs[: len(out)]]
            if self.params.logprobs:
                self.top_logprobs += [top[: self.params.logprobs] for _, top in logprobs[: len(out)]]
        return out

    def next_rng_key(self) -> int:
        """The Philox key of this sequence's next sampling op: a hash of (seed, draw counter), so
        every op gets a fresh stream and the stream depends on nothing but this sequence."""
        x = (self.params.seed ^ (self.num_draws * 0x9E3779B97F4A7C15)) & _MASK64
        self.num_draws += 1
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64  # splitmix64's finaliser
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (x ^ (x >> 31)) >> 1  # 63 bits: the ops take 0..2^63-1
