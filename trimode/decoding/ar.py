"""Autoregressive decoding (spec §5): one causal pass per token.

`ARPolicy` brings each step's tokens to the host before the step ends. `AsyncARPolicy` (async
scheduling, EngineConfig.async_steps, on by default on CUDA) keeps the host a step behind the
device: a step launches the next pass on the tokens the last one picked, still on the device, then
waits for the last step's tokens and emits them while that pass runs, so the host's work (the
engine's bookkeeping, the responses, the next step's inputs) overlaps the passes instead of
following them. The tokens are AR's; each is emitted one step later, and a sequence that ends on
EOS has run one pass past it (counted in its stats) whose token is dropped. Auto runs its AR
cycles through the same policy and emits a token in flight before it switches mode (auto.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trimode.decoding.batch import Batch, Fetch
from trimode.decoding.sequence import Sequence
from trimode.decoding.settings import DecodeConfig
from trimode.passes import PassKind
from trimode.transfer import to_device


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


class InFlight(NamedTuple):
    """One async AR step's picks: on the device (the next pass's input) and on their way to the host."""

    picks: torch.Tensor  # [b] token ids, row i of the step's batch
    fetch: Fetch  # the picks and their log probs


class AsyncARPolicy:
    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        """Launch the pass after each sequence's pending token (unless that token is its last), then
        emit the pending tokens: -> what each sequence emitted (nothing, the step it starts)."""
        earlier = [s.pending for s in batch.seqs]
        go = [i for i, s in enumerate(batch.seqs) if s.pending is None or len(s.tokens) + 2 <= s.params.max_new_tokens]
        if go:
            sub = batch if len(go) == len(batch) else batch.subset(go)
            out = sub.run(PassKind.DECODE, inputs(sub)[:, None])
            sub.advance([1] * len(sub))
            picks = sub.pick(out)
            flight = InFlight(picks[:, 0], sub.fetch_later(picks[:, 0], sub.logprobs(out, picks)))
            for row, seq in enumerate(sub.seqs):
                seq.pending = (flight, row)
        return [[] if held is None else emit_pending(seq, held) for seq, held in zip(batch.seqs, earlier)]


def is_whole_step(policy, batch: Batch) -> bool:
    """Whether policy.step(batch) is a whole step, to time: an async AR step with no token in flight
    to wait for only launches its pass."""
    return not isinstance(policy, AsyncARPolicy) or any(s.pending is not None for s in batch.seqs)


def emit_pending(seq: Sequence, held: tuple) -> list[int]:
    """Emit the token `held` (InFlight, row) brings (waiting for its transfer): the sequence's next
    token. A sequence that ended drops the pass launched after it."""
    flight, row = held
    if seq.pending is held:
        seq.pending = None
    tokens, logprobs = flight.fetch.result()
    seq.next_token = tokens[row]
    emitted = seq.emit([tokens[row]], logprobs[row])
    if seq.finish_reason:
        seq.pending = None
    return emitted


def inputs(batch: Batch) -> torch.Tensor:
    """[b] each sequence's pending token (on the device) or its next token (on the host)."""
    held = [s.pending for s in batch.seqs]
    first = held[0][0] if held[0] is not None else None
    if first is not None and all(h is not None and h[0] is first and h[1] == i for i, h in enumerate(held)):
        if len(first.picks) == len(held):
            return first.picks  # the last step's batch, as it was: its picks as they are
    tokens = to_device([s.next_token if h is None else 0 for s, h in zip(batch.seqs, held)], batch.device)
    flights: dict[int, tuple[InFlight, list[int], list[int]]] = {}
    for i, h in enumerate(held):
        if h is not None:
            _, rows, sources = flights.setdefault(id(h[0]), (h[0], [], []))
            rows.append(i)
            sources.append(h[1])
    for flight, rows, sources in flights.values():
        tokens[to_device(rows, batch.device)] = flight.picks[to_device(sources, batch.device)]
    return tokens
