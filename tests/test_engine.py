"""The engine (issue 9): requests join and leave a running batch, one KV pool for every mode, and
each sequence's tokens are what it would produce alone."""

from __future__ import annotations

import pytest
import torch

from trimode.decoding import (
    DecodeConfig,
    Engine,
    EngineConfig,
    GenerationSettings,
    Mode,
    PassKind,
    SamplingParams,
    generate,
)
from trimode.decoding.batch import Batch
from trimode.decoding.sequence import Sequence, Status
from trimode.errors import InputError, NumericalError
from trimode.passes import MODE_PASSES, Pattern

TEXTS = [
    "def generate(prompt, max_new_tokens=32):",
    "The quick brown fox",
    "A",
    "Self-speculation drafts a block by diffusion and verifies it autoregressively",
    "import os\n",
    "x = [1, 2",
    "while True:",
    "return",
]
# (mode, block length, temperature, seed) of each request, in arrival order: every mode, two block
# lengths, greedy and sampled requests in one engine.
REQUESTS = [
    (Mode.SELF_SPEC, 4, 0.0, 0),
    (Mode.AR, None, 0.0, 0),
    (Mode.DIFFUSION, 4, 0.0, 0),
    (Mode.SELF_SPEC, 8, 0.9, 11),
    (Mode.AR, None, 1.0, 12),
    (Mode.DIFFUSION, 8, 0.8, 13),
    (Mode.QUADRATIC, 4, 0.0, 0),
    (Mode.QUADRATIC, 4, 0.7, 14),
]


def alone(ck, prompt, mode, block_length, temperature, seed, max_new_tokens=24):
    settings = GenerationSettings(
        mode=mode,
        block_length=block_length,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
    )
    return generate(ck.model, [prompt], settings)[0].tokens


def request(mode, block_length, temperature, seed, max_new_tokens=24):
    return (SamplingParams(max_new_tokens, temperature, seed, ignore_eos=True), DecodeConfig(mode, block_length))


@pytest.mark.parametrize(
    "arrival_steps",
    [(0, 0, 0, 0, 0, 0, 0, 0), (0, 1, 2, 3, 5, 8, 9, 11), (0, 7, 7, 2, 15, 3, 1, 6)],
    ids=["together", "staggered", "shuffled"],
)
@pytest.mark.parametrize("ck_name", ["tiny", "trained"])
def test_requests_joining_a_running_engine_get_their_alone_tokens(request_fixture, ck_name, arrival_steps):
    ck = request_fixture(ck_name)
    prompts = [ck.tokenizer.encode(t) for t in TEXTS]
    engine = Engine(ck.model, EngineConfig(max_slots=4, max_seq_len=128, prefill_chunk=5))
    seqs, step = {}, 0
    order = sorted(range(len(REQUESTS)), key=lambda i: arrival_steps[i])
    while len(seqs) < len(REQUESTS) or engine.has_work:
        for i in order:
            if arrival_steps[i] == step and i not in seqs:
                seqs[i] = engine.add(prompts[i], *request(*REQUESTS[i]))
        engine.step()
        step += 1
    for i, (mode, block_length, temperature, seed) in enumerate(REQUESTS):
        assert seqs[i].tokens == alone(ck, prompts[i], mode, block_length, temperature, seed), REQUESTS[i]
        assert seqs[i].is_finished and len(seqs[i].tokens) == 24
    assert engine.runner.num_free == 4  # every slot came back


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


def test_an_aborted_request_frees_its_slot_and_leaves_the_others_unchanged(tiny):
    prompts = [tiny.tokenizer.encode(t) for t in TEXTS[:3]]
    engine = Engine(tiny.model, EngineConfig(max_slots=2, max_seq_len=96))
    a = engine.add(prompts[0], *request(Mode.SELF_SPEC, 4, 0.0, 0))
    b = engine.add(prompts[1], *request(Mode.AR, None, 0.0, 0))
    c = engine.add(prompts[2], *request(Mode.DIFFUSION, 4, 0.0, 0))  # waits: the pool has 2 slots
    engine.step()
    engine.step()
    assert c.status is Status.WAITING and engine.runner.num_free == 0
    assert engine.abort(b.id)
    assert b.finish_reason == "abort" and b.slot is None and engine.runner.num_free == 1
    assert not engine.abort(b.id)  # no longer live
    while engine.has_work:
        engine.step()
    assert a.tokens == alone(tiny, prompts[0], Mode.SELF_SPEC, 4, 0.0, 0)
    assert c.tokens == alone(tiny, prompts[2], Mode.DIFFUSION, 4, 0.0, 0)
    assert 1 <= len(b.tokens) < 24


def test_a_full_pool_queues_and_a_request_that_cannot_fit_is_refused(tiny):
    engine = Engine(tiny.model, EngineConfig(max_slots=1, max_seq_len=40))
    prompt = tiny.tokenizer.encode("The quick brown fox")
    with pytest.raises(InputError, match="max_seq_len=40"):
        engine.add(prompt * 3, SamplingParams(max_new_tokens=30), DecodeConfig(Mode.AR))
    first = engine.add(prompt, *request(Mode.AR, None, 0.0, 0, max_new_tokens=8))
    second = engine.add(prompt, *request(Mode.AR, None, 0.0, 0, max_new_tokens=8))
    engine.step()
    assert first.status is Status.RUNNING and second.status is Status.WAITING
    while engine.has_work:
        engine.step()
    assert first.tokens == second.tokens == alone(tiny, prompt, Mode.AR, None, 0.0, 0, max_new_tokens=8)


@pytest.mark.parametrize("bad, match", [([], "empty"), ([10**6], "token ids")])
def test_bad_prompts_are_refused(tiny, bad, match):
    with pytest.raises(InputError, match=match):
        Engine(tiny.model).add(bad)


def test_the_block_length_is_capped_at_what_can_still_be_emitted(tiny):
    """A block longer than max_new_tokens would run passes for tokens nobody may emit."""
    prompt = tiny.tokenizer.encode("A")
    seq = Engine(tiny.model).add(prompt, SamplingParams(max_new_tokens=3), DecodeConfig(Mode.DIFFUSION, 32))
    assert seq.block_length == 3
    result = generate(
        tiny.model,
        [prompt],
        GenerationSettings(mode=Mode.DIFFUSION, block_length=32, max_new_tokens=3, ignore_eos=True),
    )[0]
    assert len(result.tokens) == 3 and result.stats.passes["denoise"] <= 2


def test_non_finite_logits_stop_with_an_error(tiny_dir):
    from trimode.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_dir)
    with torch.no_grad():
        ck.model.encoder.norm.weight.fill_(float("nan"))
    for mode in Mode:
        with pytest.raises(NumericalError, match="non-finite"):
            generate(ck.model, [ck.tokenizer.encode("A")], GenerationSettings(mode=mode, max_new_tokens=4))


@pytest.mark.parametrize("mode, fetches_per_step", [(Mode.AR, 1), (Mode.SELF_SPEC, 1), (Mode.QUADRATIC, 1)])
def test_one_host_sync_per_step(tiny, monkeypatch, mode, fetches_per_step):
    """AR, self-spec (one-pass draft) and quadratic self-spec bring results to the host once per cycle."""
    calls = []
    fetch = Batch.fetch
    monkeypatch.setattr(Batch, "fetch", lambda self, *t: calls.append(1) or fetch(self, *t))
    prompts = [tiny.tokenizer.encode(t) for t in TEXTS[:3]]
    engine = Engine(tiny.model, EngineConfig(max_slots=3, max_seq_len=64))
    for p in prompts:
        engine.add(p, *request(mode, 4, 0.0, 0, max_new_tokens=12))
    engine.step()  # prefill
    for _ in range(3):
        calls.clear()
        engine.step()
        assert len(calls) == fetches_per_step


def test_fetch_gives_what_tolist_gives(tiny):
    """fetch sends everything over as one flat tensor and cuts it on the host: every shape a policy
    fetches (rows, blocks, log probs with and without top ids, token ids beside floats) comes back
    as Tensor.tolist would give it, and a non-finite pass seen since the last fetch raises."""
    from trimode.decoding.logprobs import LogProbs

    engine = Engine(tiny.model, EngineConfig(max_slots=3, max_seq_len=64))
    seqs = [engine.add([1, 2, 3], SamplingParams(max_new_tokens=4)) for _ in range(3)]
    engine.step()  # prefill: each holds a slot
    batch = Batch(engine.runner, seqs)
    gen = torch.Generator().manual_seed(0)
    ids, block = torch.randint(0, 99, (3,), generator=gen), torch.randint(0, 99, (3, 5), generator=gen)
    for num_top in (0, 2):
        lp = LogProbs(
            torch.randn(3, 5, generator=gen), torch.randint(0, 99, (3, 5, num_top)), torch.randn(3, 5, num_top)
        )
        got_ids, got_block, got_lp, nothing = batch.fetch(ids, block, lp, None)
        assert got_ids == ids.tolist() and got_block == block.tolist() and nothing == [None] * 3
        assert all(isinstance(t, int) for t in got_ids)  # ids, not the floats they travelled as
        want = [[(v, list(zip(i, w))) for v, i, w in zip(*rows)] for rows in zip(*(t.tolist() for t in lp))]
        assert got_lp == [[(pytest.approx(v), top) for v, top in row] for row in want]
    assert batch.fetch(ids) == [ids.tolist()]
    batch._is_finite.append(torch.tensor(False))
    with pytest.raises(NumericalError, match="non-finite"):
        batch.fetch(ids)


def test_random_streams_are_per_sequence():
    params = SamplingParams(seed=5)
    a, b = (Sequence(i, [1], params, DecodeConfig(), 8, frozenset()) for i in range(2))
    keys_a = [a.next_rng_key() for _ in range(4)]
    assert keys_a == [b.next_rng_key() for _ in range(4)]  # same seed, same stream, whatever the id
    assert len(set(keys_a)) == 4 and all(0 <= k < 2**63 for k in keys_a)
    other = Sequence(2, [1], SamplingParams(seed=6), DecodeConfig(), 8, frozenset())
    assert other.next_rng_key() != keys_a[0]


@pytest.mark.parametrize(
    "kind, pattern, use_draft, last_only",
    [
        (PassKind.PREFILL, Pattern.CAUSAL, False, True),
        (PassKind.DECODE, Pattern.CAUSAL, False, False),
        (PassKind.DENOISE, Pattern.BLOCK, False, False),
        (PassKind.DRAFT, Pattern.BLOCK, True, False),
        (PassKind.VERIFY, Pattern.CAUSAL, False, False),
        (PassKind.REFRESH, Pattern.CAUSAL, False, True),
        (PassKind.QUADRATIC, Pattern.QUADRATIC, False, False),  # the adapter on its mask rows only: draft_rows
    ],
)
def test_pass_kinds(kind, pattern, use_draft, last_only):
    assert (kind.pattern, kind.use_draft, kind.last_logit_only) == (pattern, use_draft, last_only)


@pytest.mark.parametrize("mode", list(Mode))
def test_statistics_count_exactly_the_mode_passes(tiny, mode):
    result = generate(
        tiny.model,
        [tiny.tokenizer.encode("A")],
        GenerationSettings(mode=mode, block_length=4, max_new_tokens=12, ignore_eos=True),
    )[0]
    assert set(result.stats.passes) == {k.value for k in MODE_PASSES[mode]}
