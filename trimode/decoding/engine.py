"""The engine: requests join and leave a running batch (nano-vllm's Scheduler + LLMEngine).

    add(prompt, params, decoding) -> Sequence   queued; its id names it in step() and abort()
    step() -> {id: new tokens}                  admit + prefill, then one cycle of each mode's policy
    abort(id)                                   the sequence ends and frees its slot at once

One step: the running sequences get the KV blocks their next cycle writes; where the pool has too
few free, the sequence admitted last is preempted (its blocks freed, back to the front of the
queue; it resumes later by prefilling its prompt and emitted tokens, so its output is unchanged).
Then waiting sequences take free slots (lowest first) and blocks for their prompt and first cycle
(a cached prefix shared, blocks.py) and run one prefill chunk each; those whose prompt is then
cached emit their first token. Then the sequences that were already running run one cycle of
their mode's policy, batched by decode config (mode, block length, threshold), so one KV pool
serves requests of every mode at once. A finished sequence frees its slot and blocks at the end of
the step that finished it; a full pool queues new requests instead of failing. With async_steps (on
CUDA) AR runs a step ahead of the host (ar.AsyncARPolicy): a preempted sequence first emits the
token it has in flight.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import NamedTuple, Protocol

import torch

from trimode.decoding.ar import ARPolicy, AsyncARPolicy, emit_pending
from trimode.decoding.auto import AutoPolicy
from trimode.decoding.batch import Batch
from trimode.decoding.blocks import BlockManager
from trimode.decoding.diffusion import DiffusionPolicy
from trimode.decoding.quadratic import QuadraticPolicy
from trimode.decoding.runner import ModelRunner
from trimode.decoding.self_spec import SelfSpecPolicy
from trimode.decoding.sequence import Sequence, Status
from trimode.decoding.settings import DecodeConfig, EngineConfig, SamplingParams, env_switch
from trimode.decoding.step_times import StepTimes
from trimode.errors import InputError
from trimode.model import NLDModel
from trimode.passes import Mode, PassKind, cycle_positions
from trimode.transfer import to_device


class KVUsage(NamedTuple):
    """The pool at a step boundary (metrics): counters since the engine was built."""

    blocks_used: int  # held by a sequence (cached blocks nobody holds are free)
    preemptions: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int


class Policy(Protocol):
    """A mode's decoding (ar.py, diffusion.py, self_spec.py): one step of a batch -> each sequence's new tokens."""

    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]: ...


class Engine:
    def __init__(
        self,
        model: NLDModel,
        config: EngineConfig = EngineConfig(),
        policies: dict | None = None,
        backend=None,
        block_lengths: tuple[int, ...] | None = None,
    ):
        """backend: what runs the passes (runner.py); None = the eager reference model.
        block_lengths: the only block lengths the backend runs (a built engine's); None = any."""
        self.model, self.spec, self.config, self.block_lengths = model, model.spec, config, block_lengths
        self.runner = ModelRunner(model, config, backend)
        cache = self.runner.cache
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, config.enable_prefix_caching)
        self.num_preemptions = 0
        self.policies: dict[Mode, Policy] = {
            Mode.AR: ARPolicy(),
            Mode.DIFFUSION: DiffusionPolicy(),
            Mode.SELF_SPEC: SelfSpecPolicy(),
            Mode.QUADRATIC: QuadraticPolicy(),
        }
        self.policies.update(policies or {})
        self.async_steps = use_async_steps(config, model.device)
        if self.async_steps:
            self.policies[Mode.AR] = AsyncARPolicy()
        self.auto = AutoPolicy(dict(self.policies))  # AR ahead of the host too (auto.py settles it to switch)
        self.policies[Mode.AUTO] = self.auto
        # set: times the fixed modes' steps (`trimode bench --save-step-times`)
        self.step_times: StepTimes | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # hold a slot: prefilling or running
        self._ids = itertools.count()
        self._settled: dict[int, list[int]] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_usage(self) -> KVUsage:
        stats = self.blocks.stats
        return KVUsage(self.blocks.num_used, self.num_preemptions, stats.queried_tokens, stats.hit_tokens)

    def add(
        self, prompt: list[int], params: SamplingParams = SamplingParams(), decoding: DecodeConfig = DecodeConfig()
    ) -> Sequence:
        """Queue a request; refuse one that could never fit the pool (a full pool only queues)."""
        spec = self.spec
        if not prompt:
            raise InputError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= spec.vocab_size:
            raise InputError(f"prompt token ids must lie in [0, {spec.vocab_size})")
        block_length = resolve_block_length(spec, decoding, params, self.block_lengths)
        widths = self._auto_widths(decoding, block_length, len(prompt) + params.max_new_tokens, params.max_new_tokens)
        if widths and block_length not in widths:
            block_length = max(widths)
        cycle = max(cycle_positions(decoding.mode, w) for w in widths or (block_length,))
        needed = len(prompt) + params.max_new_tokens + cycle
        if needed > self.config.max_seq_len:
            raise InputError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) + one cycle "
                f"({cycle} positions) need {needed} positions; this engine holds max_seq_len="
                f"{self.config.max_seq_len}"
            )
        check_positions(spec, len(prompt), params.max_new_tokens)
        eos_ids = frozenset(() if params.ignore_eos else (*spec.eos_token_ids, *params.stop_token_ids))
        seq = Sequence(next(self._ids), list(prompt), params, decoding, block_length, eos_ids, widths=widths)
        self.waiting.append(seq)
        return seq

    def _auto_widths(self, decoding: DecodeConfig, block_length: int, length: int, room: int) -> tuple[int, ...]:
        """The block lengths auto may run a sequence at (none: not auto): the one its request named;
        else every one this engine runs that is no longer than what it may emit (room) and whose
        quadratic cycle fits max_seq_len after its length, or else its default (add refuses what never fits)."""
        if decoding.mode is not Mode.AUTO:
            return ()
        if decoding.block_length is not None or self.block_lengths is None:
            return (block_length,)
        fits = [
            w
            for w in sorted(self.block_lengths)
            if w <= room and length + cycle_positions(Mode.AUTO, w) <= self.config.max_seq_len
        ]
        return tuple(fits) or (block_length,)

    def abort(self, seq_id: int) -> bool:
        """End a waiting or running sequence now (finish_reason "abort"); False if it is not live."""
        for seq in [*self.waiting, *self.running]:
            if seq.id == seq_id:
                seq.finish_reason = seq.finish_reason or "abort"
                self._retire(seq)
                return True
        return False

    def step(self) -> dict[int, list[int]]:
        """One scheduling step -> the tokens each sequence emitted in it (absent: none)."""
        cycling = [s for s in self.running if s.status is Status.RUNNING]
        for group in _groups([s for s in cycling if s.decoding.mode is Mode.AUTO]):
            choice = self.auto.choose(Batch(self.runner, group))  # first: its cycle sets the blocks to grow
            for seq in group:
                seq.auto_choice = choice
        self._settled = {}  # the pending tokens of sequences preempted now (async AR)
        cycling = self._grow(cycling)
        self._admit()
        new: dict[int, list[int]] = {}
        prefilling = [s for s in self.running if s.status is Status.PREFILL]
        for group in self._prefill_groups(prefilling):
            for seq, tokens in zip(group, prefill(Batch(self.runner, group), self.config.prefill_chunk)):
                new[seq.id] = tokens
        timer = self.step_times
        for group in _groups(cycling):
            policy, batch, config = self.policies[group[0].decoding.mode], Batch(self.runner, group), group[0].decoding
            emitted = timer.run(policy, batch, config) if timer else policy.step(batch, config)
            for seq, tokens in zip(group, emitted):
                new[seq.id] = tokens
        for seq in self.running:
            self._key_full_blocks(seq)
        for seq in [s for s in self.running if s.finish_reason]:
            self._retire(seq)
        for seq_id, tokens in self._settled.items():  # emitted before this step's tokens
            new[seq_id] = tokens + new.get(seq_id, [])
        return new

    def _grow(self, cycling: list[Sequence]) -> list[Sequence]:
        """Blocks for every position each sequence's next cycle writes, preempting the sequence
        admitted last while too few are free. -> the sequences that still hold their blocks."""
        for seq in list(cycling):
            if seq not in self.running:  # preempted for one before it
                continue
            need = self.runner.host_lengths[seq.held_slot] + self._cycle_positions(seq)
            held = len(seq.kv.blocks)
            while not self.blocks.grow(seq.kv, need):
                self._preempt(self.running[-1])  # at worst seq itself: alone, one sequence always fits
                if seq not in self.running:
                    break
            else:
                self.runner.set_blocks(seq.held_slot, seq.kv.blocks, held)
        return [s for s in cycling if s in self.running]

    def _cycle_positions(self, seq: Sequence) -> int:
        """Positions past its length its next cycle writes; auto's: of the choice made for it this step,
        or at admission of the choice auto ran last (a cycle that needs more grows then)."""
        if seq.decoding.mode is Mode.AUTO:
            return cycle_positions(*(seq.auto_choice or self.auto.last_choice(seq.widths)))
        return cycle_positions(seq.decoding.mode, seq.block_length)

    def _admit(self) -> None:
        """Seats and blocks in arrival order (a sequence that does not fit yet waits, and so do those behind it)."""
        while self.waiting and self.runner.num_free:
            seq = self.waiting[0]
            tokens = seq.prefill_tokens
            # a fresh prompt's last token is computed (its logit gives the first token); a resumed one knows it
            cached = self.blocks.admit(seq.kv, tokens, len(tokens) + self._cycle_positions(seq), 0 if seq.tokens else 1)
            if cached is None:
                break
            self.waiting.popleft()
            seq.slot, seq.num_prefilled, seq.status = self.runner.allocate(), cached, Status.PREFILL
            seq.stats.num_cached_tokens += cached
            self.runner.set_blocks(seq.slot, seq.kv.blocks)
            self.runner.advance([seq.slot], [cached])
            if cached == len(tokens):  # a resumed sequence found whole in the cache
                seq.status = Status.RUNNING
            self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's slot and blocks and queue it first: it resumes by prefilling seq.prefill_tokens
        (its pending token emitted first: async AR; the token that ends it retires it instead)."""
        if seq.pending is not None:
            self._settled[seq.id] = emit_pending(seq, seq.pending)
            if seq.finish_reason:
                self._retire(seq)
                return
        self._key_full_blocks(seq)  # findable when it resumes
        self._free_kv(seq)
        self.running.remove(seq)
        seq.status, seq.slot, seq.num_prefilled, seq.auto_choice = Status.WAITING, None, 0, None
        seq.stats.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _key_full_blocks(self, seq: Sequence) -> None:
        """Put seq's newly filled blocks in the prefix cache. The cache holds prompt + tokens[:-1]; a
        last cycle may commit more than was emitted (cut at EOS or max_new_tokens): not keyed."""
        length = min(self.runner.host_lengths[seq.held_slot], len(seq.prompt) + len(seq.tokens))
        if length // self.blocks.block_size > len(seq.kv.keys):
            self.blocks.commit(seq.kv, seq.all_tokens, length)

    def _retire(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self._free_kv(seq)
        seq.status, seq.slot, seq.pending = Status.FINISHED, None, None

    def _free_kv(self, seq: Sequence) -> None:
        self.blocks.release(seq.kv)
        self.runner.release(seq.held_slot)

    def _prefill_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """One batched prefill pass, unless its padding would run past the pool: then one pass each."""
        if not seqs:
            return []
        seqs = sorted(seqs, key=lambda s: s.held_slot)
        chunk = max(_chunk_len(s, self.config.prefill_chunk) for s in seqs)
        if max(s.num_prefilled for s in seqs) + chunk <= self.runner.max_seq_len:
            return [seqs]
        return [[s] for s in seqs]


def use_async_steps(config: EngineConfig, device: torch.device) -> bool:
    """config.async_steps, else TRIMODE_ASYNC_STEPS=1 / 0, else on CUDA (on CPU a pass is synchronous:
    nothing to overlap, and each token would leave a step later)."""
    if config.async_steps is not None:
        return config.async_steps
    return env_switch("TRIMODE_ASYNC_STEPS", device.type == "cuda")


def _groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Sequences one policy step runs together: same mode, block length (auto: the same widths, of which
    it chooses one for them all) and threshold; in ascending slots (contiguous rows need no gather)."""
    groups: dict[tuple, list[Sequence]] = {}
    for seq in seqs:
        width = seq.widths if seq.decoding.mode is Mode.AUTO else seq.block_length
        groups.setdefault((seq.decoding.mode, width, seq.decoding.commit_threshold), []).append(seq)
    return [sorted(group, key=lambda s: s.held_slot) for group in groups.values()]


def resolve_block_length(
    spec, decoding: DecodeConfig, params: SamplingParams, allowed: tuple[int, ...] | None = None
) -> int:
    """The engine's default (default_block_length) unless asked otherwise, and never longer than what
    the sequence may emit (a longer block would run passes for tokens nobody may emit), unless that
    shorter block is not among the `allowed` lengths a built engine runs."""
    block_length = decoding.block_length or default_block_length(spec, allowed)
    if allowed is not None and decoding.mode is not Mode.AR and block_length not in allowed:
        raise InputError(
            f"block length {block_length}: this engine was built for block lengths "
            f"{', '.join(map(str, allowed))} (rebuild with --block-lengths)"
        )
    capped = min(block_length, params.max_new_tokens)
    return capped if allowed is None or capped in allowed or decoding.mode is Mode.AR else block_length


def default_block_length(spec, allowed: tuple[int, ...] | None) -> int:
    """What a request that names no block length runs: the checkpoint's block_size where the engine
    runs it (an eager one runs any), else the first length it was built for."""
    return spec.block_size if allowed is None or spec.block_size in allowed else allowed[0]


def check_positions(spec, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len + max_new_tokens > spec.max_position_embeddings:
        raise InputError(f"prompt + max_new_tokens exceed max_position_embeddings={spec.max_position_embeddings}")


def _chunk_len(seq: Sequence, prefill_chunk: int | None) -> int:
    remaining = len(seq.prefill_tokens) - seq.num_prefilled
    return remaining if prefill_chunk is None else min(prefill_chunk, remaining)


def prefill(batch: Batch, prefill_chunk: int | None) -> list[list[int]]:
    """One causal pass over each sequence's next prompt chunk (ragged chunks padded; the padding's
    K/V stays scratch). A sequence whose prompt is then cached picks its first token from its
    last prompt logit (which also gives that token's log prob): it is emitted, and becomes its next
    token. A resumed sequence (preempted) has its next token already: it only runs on."""
    counts = [_chunk_len(s, prefill_chunk) for s in batch.seqs]
    pad, width = batch.spec.pad_token_id or 0, max(counts)
    rows = [
        s.prefill_tokens[s.num_prefilled : s.num_prefilled + n] + [pad] * (width - n)
        for s, n in zip(batch.seqs, counts)
    ]
    tokens = to_device(rows, batch.device)
    out = batch.run(PassKind.PREFILL, tokens, to_device([n - 1 for n in counts], batch.device))
    batch.advance(counts)
    for seq, n in zip(batch.seqs, counts):
        seq.num_prefilled += n
    done = [i for i, seq in enumerate(batch.seqs) if seq.num_prefilled == len(seq.prefill_tokens)]
    for seq in (batch.seqs[i] for i in done if batch.seqs[i].tokens):
        seq.status = Status.RUNNING
    done = [i for i in done if not batch.seqs[i].tokens]
    new: list[list[int]] = [[] for _ in batch.seqs]
    if done:
        sub, last = batch.subset(done), out.rows(done)
        picks = sub.pick(last)
        firsts, logprobs = sub.fetch(picks[:, 0], sub.logprobs(last, picks))
        for i, seq, t, lp in zip(done, sub.seqs, firsts, logprobs):
            seq.next_token, seq.status = t, Status.RUNNING
            new[i] = seq.emit([t], lp)
    return new
