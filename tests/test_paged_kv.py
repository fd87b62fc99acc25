"""The paged KV pool (issue 23): blocks handed out and taken back, a prefix cache shared between
requests, preemption when the pool runs dry, and through all of it the tokens of a dense pool."""

from __future__ import annotations

import random

import pytest
import torch

from trimode.decoding import DecodeConfig, Engine, EngineConfig, Mode, SamplingParams
from trimode.decoding.blocks import BlockManager, BlockState
from trimode.decoding.sequence import Status
from trimode.errors import InputError
from trimode.kv_cache import blocks_for_memory, parse_memory

from test_engine import REQUESTS, TEXTS  # every mode, greedy and sampled, two block lengths

MAX_SEQ_LEN = 96


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


def run(ck, config: EngineConfig, prompts, requests, max_new_tokens=24, max_steps=10_000):
    """Every request added at once, stepped to the end (a bounded number of steps: no deadlock)."""
    engine = Engine(ck.model, config)
    seqs = [
        engine.add(p, SamplingParams(max_new_tokens, t, seed, ignore_eos=True), DecodeConfig(mode, block_length))
        for p, (mode, block_length, t, seed) in zip(prompts, requests)
    ]
    for _ in range(max_steps):
        if not engine.has_work:
            break
        engine.step()
    assert not engine.has_work, "the engine stopped making progress"
    assert engine.blocks.num_used == 0 and engine.runner.num_free == config.max_slots  # everything given back
    return engine, seqs


def dense(max_slots: int = 6) -> EngineConfig:
    return EngineConfig(max_slots=max_slots, max_seq_len=MAX_SEQ_LEN, kv_block_size=MAX_SEQ_LEN)


# --- the engine: tokens as with a dense pool -------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("ck_name", ["tiny", "trained"])
def test_paged_pool_gives_the_dense_pools_tokens_in_every_mode(request_fixture, ck_name, block_size):
    ck = request_fixture(ck_name)
    prompts = [ck.tokenizer.encode(t) for t in TEXTS]
    _, want = run(ck, dense(), prompts, REQUESTS)
    config = EngineConfig(max_slots=6, max_seq_len=MAX_SEQ_LEN, kv_block_size=block_size, prefill_chunk=5)
    _, got = run(ck, config, prompts, REQUESTS)
    assert [s.tokens for s in got] == [s.tokens for s in want]
    for alone_index in (0, 2):  # batch 1 too
        _, (one,) = run(ck, config, [prompts[alone_index]], [REQUESTS[alone_index]])
        assert one.tokens == want[alone_index].tokens


def test_self_spec_equals_ar_on_a_paged_pool(trained):
    prompts = [trained.tokenizer.encode(t) for t in TEXTS]
    config = EngineConfig(max_slots=6, max_seq_len=MAX_SEQ_LEN, kv_block_size=4)
    _, ar = run(trained, config, prompts, [(Mode.AR, None, 0.0, 0)] * len(prompts))
    _, spec = run(trained, config, prompts, [(Mode.SELF_SPEC, 8, 0.0, 0)] * len(prompts))
    assert [s.tokens for s in spec] == [s.tokens for s in ar]
    assert any(n > 1 for s in spec for n in s.stats.accepted_lengths)


# --- preemption --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [4, 8])
def test_a_pool_too_small_for_the_load_preempts_and_resumes_with_exact_tokens(trained, block_size):
    """Six requests of every mode on a pool that holds one max_seq_len sequence and a bit: the engine
    preempts, every request finishes with its dense-pool tokens, and no block is lost."""
    prompts = [trained.tokenizer.encode(t) for t in TEXTS]
    _, want = run(trained, dense(), prompts, REQUESTS, max_new_tokens=48)
    num_blocks = -(-MAX_SEQ_LEN // block_size) + 2
    config = EngineConfig(max_slots=6, max_seq_len=MAX_SEQ_LEN, kv_block_size=block_size, num_kv_blocks=num_blocks)
    engine, got = run(trained, config, prompts, REQUESTS, max_new_tokens=48)
    assert engine.num_preemptions > 0 and sum(s.stats.num_preemptions for s in got) == engine.num_preemptions
    assert [s.tokens for s in got] == [s.tokens for s in want]


def test_a_preempted_sequence_resumes_from_the_prefix_cache(trained):
    """What a preempted sequence had computed is keyed before its blocks are freed: when it comes
    back its prefill finds most of it (nothing else ran in between to evict it)."""
    prompt = trained.tokenizer.encode(TEXTS[3])
    config = EngineConfig(max_slots=2, max_seq_len=MAX_SEQ_LEN, kv_block_size=4)
    engine = Engine(trained.model, config)
    seq = engine.add(prompt, SamplingParams(40, ignore_eos=True), DecodeConfig(Mode.AR))
    for _ in range(20):
        engine.step()
    length = engine.runner.host_lengths[seq.held_slot]
    engine._preempt(seq)
    assert seq.status is Status.WAITING and engine.blocks.num_used == 0
    engine.step()
    assert seq.status is Status.RUNNING
    assert seq.stats.num_cached_tokens == (length // 4) * 4
    while engine.has_work:
        engine.step()
    alone = Engine(trained.model, config)
    ref = alone.add(prompt, SamplingParams(40, ignore_eos=True), DecodeConfig(Mode.AR))
    while alone.has_work:
        alone.step()
    assert seq.tokens == ref.tokens


# --- prefix caching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, block_length", [(Mode.AR, None), (Mode.SELF_SPEC, 4), (Mode.DIFFUSION, 4), (Mode.QUADRATIC, 4)]
)
def test_requests_sharing_a_prefix_reuse_its_blocks_with_the_same_tokens(trained, mode, block_length):
    shared = trained.tokenizer.encode("import os\nimport sys\nimport json\n\n\ndef main(argv):\n    ")
    prompts = [shared + trained.tokenizer.encode(t) for t in ("a = 1", "return argv", "print(os.getcwd())")]
    config = EngineConfig(max_slots=3, max_seq_len=MAX_SEQ_LEN, kv_block_size=4)
    engine = Engine(trained.model, config)
    first = engine.add(prompts[0], SamplingParams(16), DecodeConfig(mode, block_length))
    while engine.has_work:
        engine.step()
    later = [engine.add(p, SamplingParams(16), DecodeConfig(mode, block_length)) for p in prompts[1:]]
    while engine.has_work:
        engine.step()
    assert first.stats.num_cached_tokens == 0
    common = next(i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1)  # BOS included
    assert common >= len(shared)
    for seq in later:
        assert seq.stats.num_cached_tokens == (common // 4) * 4  # every full block of the shared prefix
    _, cold = run(trained, dense(3), prompts, [(mode, block_length, 0.0, 0)] * 3, max_new_tokens=16)
    assert [s.tokens for s in [first, *later]] == [s.tokens for s in cold]
    assert engine.blocks.stats.hit_tokens == sum(s.stats.num_cached_tokens for s in later)


def test_a_fully_cached_prompt_still_computes_its_last_token(trained):
    """A prompt of whole blocks, all cached: its last block is computed again (its last logit gives the
    first token), and the tokens are those of the first run."""
    prompt = trained.tokenizer.encode("def main():\n    return 0\n")[:8]
    config = EngineConfig(max_slots=1, max_seq_len=MAX_SEQ_LEN, kv_block_size=4)
    engine = Engine(trained.model, config)
    runs = []
    for _ in range(2):
        runs.append(engine.add(prompt, SamplingParams(8, ignore_eos=True), DecodeConfig(Mode.AR)))
        while engine.has_work:
            engine.step()
    assert runs[1].stats.num_cached_tokens == 4 and runs[1].tokens == runs[0].tokens


def test_concurrent_requests_share_blocks_and_only_the_last_holder_frees_them(trained):
    shared = trained.tokenizer.encode("class Config:\n    def __init__(self, path):\n        ")
    config = EngineConfig(max_slots=4, max_seq_len=MAX_SEQ_LEN, kv_block_size=4)
    engine = Engine(trained.model, config)
    first = engine.add(shared + [5], SamplingParams(4), DecodeConfig(Mode.AR))
    engine.step()  # prefilled, its full blocks keyed at the end of the step
    others = [
        engine.add(shared + [6 + i], SamplingParams(30, ignore_eos=True), DecodeConfig(Mode.AR)) for i in range(2)
    ]
    engine.step()
    common = first.kv.blocks[: len(shared) // 4]
    assert all(o.kv.blocks[: len(common)] == common for o in others)
    assert all(engine.blocks.ref_counts[b] == 3 for b in common)
    while not first.is_finished:
        engine.step()
    assert all(engine.blocks.ref_counts[b] == 2 for b in common)
    while engine.has_work:
        engine.step()
    assert engine.blocks.num_used == 0


# --- the block manager alone -----------------------------------------------------------------------------


def test_block_manager_hands_out_each_block_once_and_evicts_least_recently_freed():
    blocks = BlockManager(num_blocks=6, block_size=2)
    a, b = BlockState(), BlockState()
    assert blocks.admit(a, [1, 2, 3, 4, 5], 6, 1) == 0 and len(a.blocks) == 3
    blocks.commit(a, [1, 2, 3, 4, 5], 5)  # two full blocks keyed
    assert len(a.keys) == 2 and len(blocks.cached) == 2
    assert blocks.admit(b, [1, 2, 3, 4, 9], 5, 1) == 4 and b.blocks[:2] == a.blocks[:2]
    assert blocks.num_free == 2
    assert not blocks.grow(b, 2 * 6)  # 6 blocks: 3 more than b has, 2 free
    assert len(b.blocks) == 3
    blocks.release(a)
    assert blocks.num_free == 3  # a's last block; the shared two are still b's
    blocks.release(b)
    assert blocks.num_free == 6 and blocks.num_used == 0
    # the unkeyed blocks go first; then the keyed ones, least recently freed first
    # (b freed its blocks last first: a's second block before the first, so it goes before it)
    c = BlockState()
    first, second = blocks.cached_prefix([1, 2, 3, 4], 2)
    assert blocks.admit(c, [7] * 10, 10, 1) == 0 and len(c.blocks) == 5
    assert second in c.blocks and first not in c.blocks
    assert list(blocks.cached.values()) == [first] and blocks.cached_prefix([1, 2, 3, 4], 2) == [first]


def test_block_manager_survives_random_traffic_without_losing_a_block():
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=40, block_size=4)
    live: list[tuple[BlockState, list[int], int]] = []
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for _ in range(2000):
        if live and rng.random() < 0.3:
            state, _, _ = live.pop(rng.randrange(len(live)))
            blocks.release(state)
        elif rng.random() < 0.5 and live:
            i = rng.randrange(len(live))
            state, tokens, length = live[i]
            tokens = tokens + [rng.randrange(50) for _ in range(rng.randrange(1, 6))]
            if blocks.grow(state, len(tokens)):
                blocks.commit(state, tokens, len(tokens))
                live[i] = (state, tokens, len(tokens))
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            state = BlockState()
            cached = blocks.admit(state, tokens, len(tokens) + 4, 1)
            if cached is not None:
                assert cached % 4 == 0 and cached < len(tokens)
                blocks.commit(state, tokens, len(tokens))
                live.append((state, tokens, len(tokens)))
        held = [b for state, _, _ in live for b in state.blocks]
        for block in set(held):
            assert blocks.ref_counts[block] == held.count(block)
        assert blocks.num_free + len(set(held)) == 40
        assert all(blocks.block_keys[b] == k for k, b in blocks.cached.items())
        for state, tokens, _ in live:  # every keyed block holds the tokens its key says
            found = blocks.cached_prefix(tokens, len(state.keys))
            assert [blocks.block_keys[b] for b in found] == state.keys[: len(found)]


# --- the budget ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("2GiB", (2 << 30, None)), ("512MiB", (512 << 20, None)), ("1000000", (10**6, None)), ("0.5", (None, 0.5))],
)
def test_kv_cache_memory_reads_bytes_or_a_fraction(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "abc", "nan", "inf", "1.5", "0.5x", ""])
def test_kv_cache_memory_refuses_what_is_neither(text):
    with pytest.raises(InputError, match="KV cache memory"):
        parse_memory(text)


def test_a_budget_below_one_max_seq_len_sequence_is_refused_with_the_numbers(tiny):
    spec, dtype = tiny.model.spec, tiny.model.kv_dtype
    per_block = spec.num_hidden_layers * 2 * 16 * spec.num_key_value_heads * spec.head_dim * dtype.itemsize
    assert blocks_for_memory(spec, dtype, 16, 256, str(17 * per_block)) == 16
    with pytest.raises(InputError, match=r"holds 15 blocks of 16 positions .* max_seq_len 256 needs 16"):
        blocks_for_memory(spec, dtype, 16, 256, str(16 * per_block))


def test_engine_pool_is_the_configured_blocks(tiny):
    engine = Engine(tiny.model, EngineConfig(max_slots=3, max_seq_len=64, kv_block_size=8, num_kv_blocks=20))
    cache = engine.runner.cache
    assert cache.num_blocks == 20 and cache.block_size == 8 and cache.k[0].shape[0] == 21
    assert cache.block_tables.shape == (3, 8)
    assert cache.num_bytes == 21 * 2 * len(cache.k) * cache.k[0][0].numel() * cache.k[0].element_size()
    with pytest.raises(InputError, match="num_kv_blocks"):
        EngineConfig(max_slots=3, max_seq_len=64, kv_block_size=8, num_kv_blocks=7)
    assert torch.equal(cache.block_tables, torch.full((3, 8), 20))


# --- through the kernels (interpreted on CPU) ------------------------------------------------------------


def test_kernels_on_a_paged_pool_give_the_dense_reference_tokens(tiny, monkeypatch):
    """block_attention's kernel reading and writing 4-position blocks (several per key tile, a shared
    prefix, a preemption) gives the tokens of the torch reference on a dense pool."""
    from trimode.plugins import ops

    shared = tiny.tokenizer.encode("def generate(prompt, max_new_tokens=32):")
    prompts = [shared, shared + [7, 8], tiny.tokenizer.encode("A")]
    requests = [(Mode.SELF_SPEC, 4, 0.0, 0), (Mode.AR, None, 0.0, 0), (Mode.DIFFUSION, 4, 0.0, 0)]
    monkeypatch.setenv(ops.KERNELS_ENV, "reference")
    _, want = run(tiny, dense(3), prompts, requests, max_new_tokens=8)
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    config = EngineConfig(max_slots=3, max_seq_len=40, kv_block_size=4, num_kv_blocks=10)  # one sequence's worth
    engine, got = run(tiny, config, prompts, requests, max_new_tokens=8)
    assert engine.runner.kernels
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert engine.num_preemptions > 0 and engine.blocks.stats.hit_tokens > 0  # resumed from the prefix cache
