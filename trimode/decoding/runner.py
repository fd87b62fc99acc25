"""ModelRunner: the KV pool for the engine's life and one forward pass at a time (nano-vllm's cut).

`run(kind, tokens [b, L], slots)` runs one pass of a `PassKind` for the sequences in `slots` and
returns its logits (a PassOutput); `advance(slots, counts)` commits tokens; `allocate` / `release`
hand out slots (a batch seat: a length and a block table), `set_blocks` fills a slot's table with
the KV blocks the engine's BlockManager gave its sequence.
The runner keeps each slot's committed length on the host only (the pool's `lengths` tensor is the
model's interface, unused here): a pass gets them as a list, so it needs no host sync to size its
attention.

The backend is fixed when the runner is built. A backend is a callable
    backend(kind, tokens [b, L], pool: KVCache, slots: list[int], lengths: list[int], logit_index [b] | None)
    -> logits [b, L, V] fp32 ([b, 1, V] for last-logit kinds), or a PassOutput
that writes the chunk's K/V into the blocks of `slots` (pool.block_tables[slots]; lengths: their
committed lengths, on the host). `EagerBackend` (here) is the reference model; the builder's engine dirs supply compiled ones,
which also return the greedy picks they compute with the logits.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from typing import NamedTuple

import torch

from trimode.decoding.settings import EngineConfig
from trimode.errors import InputError
from trimode.kv_cache import KVCache
from trimode.model import NLDModel
from trimode.passes import PassKind
from trimode.plugins.ops import use_kernels
from trimode.transfer import to_device


class PassOutput(NamedTuple):
    """One pass's result. A backend that computes more than the logits in the same program returns
    it here, so a greedy batch needs no tensor work of its own on the logits (decoding/batch.py)."""

    logits: torch.Tensor  # [b, L, V] fp32 ([b, 1, V] for last-logit kinds)
    picks: torch.Tensor | None = None  # [b, L] reference.greedy_tokens(logits)
    is_finite: torch.Tensor | None = None  # [] bool: every logit of the pass is finite
    confidence: torch.Tensor | None = None  # [b, L] reference.pick_confidence(logits, picks): block kinds

    def rows(self, index: list[int]) -> "PassOutput":
        """The rows `index` of the batch (is_finite stays the whole pass's)."""
        return PassOutput(
            self.logits[index],
            None if self.picks is None else self.picks[index],
            self.is_finite,
            None if self.confidence is None else self.confidence[index],
        )


class EagerBackend:
    """The reference model as a backend, over the pool's blocks with the batch's lengths and tables
    (a contiguous run of slots: a slice of the tables, no gather)."""

    def __init__(self, model: NLDModel, kernels: bool):
        self.model, self.kernels = model, kernels

    def __call__(
        self,
        kind: PassKind,
        tokens: torch.Tensor,
        pool: KVCache,
        slots: list[int],
        lengths: list[int],
        logit_index: torch.Tensor | None,
    ) -> torch.Tensor:
        batch = KVCache(pool.k, pool.v, to_device(lengths, tokens.device), pool.slot_tables(slots))
        with torch.no_grad():
            return self.model(tokens, batch, kind, None, logit_index, (min(lengths), max(lengths)), self.kernels)


class PassClock:
    """Seconds spent inside forward passes since the runner was built: what `trimode bench` divides by
    wall time ("pass efficiency": the share of time the host is out of the way). On CPU a pass is
    synchronous, so its host time is its time; on CUDA each pass is bracketed by events, the passes
    already done are added up as new ones start (no wait), and the rest when asked (a sync: the bench
    asks between runs, the metrics when the engine is idle), so a server that is never idle keeps
    only the events of the passes in flight."""

    def __init__(self, device: torch.device):
        self.is_cuda = device.type == "cuda"
        self._seconds = 0.0
        self._events: deque = deque()

    def start(self):
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> None:
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append((started, event))
            while self._events and self._events[0][1].query():  # done: its time is known without waiting
                begin, end = self._events.popleft()
                self._seconds += begin.elapsed_time(end) / 1e3
        else:
            self._seconds += time.perf_counter() - started

    @property
    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events.clear()
        return self._seconds


class ModelRunner:
    def __init__(self, model: NLDModel, config: EngineConfig, backend=None):
        self.model, self.device = model, model.device
        self.clock = PassClock(model.device)
        self.kernels = use_kernels(model.device)  # the plugins' kernels or the torch references, decided once
        self.backend = backend or EagerBackend(model, self.kernels)
        self.cache = model.new_cache(config.max_slots, config.max_seq_len, config.block_size, config.num_kv_blocks)
        self.max_seq_len = config.max_seq_len
        self.host_lengths = [0] * config.max_slots
        self._free = list(range(config.max_slots))  # a heap: the lowest free slot first keeps batches contiguous

    @property
    def max_slots(self) -> int:
        return self.cache.num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise InputError("the KV pool has no free slot")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        self.cache.block_tables[slot] = self.cache.null_block
        self.host_lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def set_blocks(self, slot: int, blocks: list[int], start: int = 0) -> None:
        """slot's table from entry `start` on: blocks (the blocks it held before start stay)."""
        if len(blocks) > start:
            self.cache.block_tables[slot, start : len(blocks)] = to_device(
                blocks[start:], self.cache.block_tables.device
            )

    def run(
        self, kind: PassKind, tokens: torch.Tensor, slots: list[int], logit_index: torch.Tensor | None = None
    ) -> PassOutput:
        """One pass over tokens [b, L] of the sequences in `slots` -> fp32 logits [b, L, V], or
        [b, 1, V] for the kinds that need only a last logit (at logit_index [b], default L-1)."""
        if kind.last_logit_only and logit_index is None:
            logit_index = torch.full((len(slots),), tokens.shape[1] - 1, device=tokens.device)
        lengths = [self.host_lengths[s] for s in slots]
        assert max(lengths) + tokens.shape[1] <= self.max_seq_len, "a pass past the pool's max_seq_len"
        started = self.clock.start()
        out = self.backend(kind, tokens, self.cache, slots, lengths, logit_index)
        self.clock.stop(started)
        return out if isinstance(out, PassOutput) else PassOutput(out)

    def advance(self, slots: list[int], counts: list[int]) -> None:
        """Commit counts[i] more tokens of slots[i] (the K/V the last pass wrote for them): host only,
        a backend gets the lengths with each pass (a device update here was 15% of an AR step)."""
        for s, n in zip(slots, counts):
            self.host_lengths[s] += n
