"""Quadratic self-speculation (decoding/quadratic.py, ../shared/spec/quadratic.md): one pass per
cycle, and at temperature 0 exactly the AR greedy tokens."""

from __future__ import annotations

import pytest
import torch
from test_decoding import prompts_of, run, tokens_of

from trimode.decoding import Engine, EngineConfig, GenerationSettings, Mode, PassKind, engine_for
from trimode.decoding.batch import Batch
from trimode.errors import InputError
from trimode.model import DRAFT_LINEARS
from trimode.plugins.reference import quadratic_offsets, quadratic_tokens, quadratic_visibility


@pytest.fixture(params=["tiny", "tiny_adapter", "tiny_wide_adapter", "trained"])
def ck(request):
    return request.getfixturevalue(request.param)


def test_the_chunk_layout_is_spelled_out_for_two():
    """W = 2: the chain t0 t1, then row 0's masks (positions 1, 2) and row 1's (2, 3)."""
    assert quadratic_offsets(2).tolist() == [0, 1, 1, 2, 2, 3]
    assert quadratic_visibility(2).int().tolist() == [
        [1, 0, 0, 0, 0, 0],  # t0: itself
        [1, 1, 0, 0, 0, 0],  # t1: the chain up to itself
        [1, 0, 1, 1, 0, 0],  # row 0's masks: t0 and row 0
        [1, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1],  # row 1's masks: t0, t1 and row 1
        [1, 1, 0, 0, 1, 1],
    ]


@pytest.mark.parametrize("block_length", [4, 8, 16])
@pytest.mark.parametrize("batched", [False, True])
def test_quadratic_greedy_equals_ar(ck, block_length, batched):
    prompts = prompts_of(ck)
    ar = run(ck, Mode.AR, prompts)
    if batched:
        quad = run(ck, Mode.QUADRATIC, prompts, block_length=block_length)
    else:
        quad = [run(ck, Mode.QUADRATIC, [p], block_length=block_length)[0] for p in prompts]
    assert tokens_of(quad) == tokens_of(ar)
    for r in quad:  # one pass per cycle; the first cycle has no drafts yet, so it accepts exactly 1
        assert r.stats.passes["quadratic"] == len(r.stats.accepted_lengths)
        assert r.stats.num_passes == 1 + len(r.stats.accepted_lengths)
        assert r.stats.accepted_lengths[0] == 1
        assert all(1 <= n <= block_length for n in r.stats.accepted_lengths)


def test_quadratic_beats_linear_in_tokens_per_pass(trained):
    """The embedded checkpoint drafts well enough that one pass per cycle pays (spec/quadratic.md)."""
    prompts = prompts_of(trained)
    quad = run(trained, Mode.QUADRATIC, prompts, block_length=8, max_new_tokens=64, ignore_eos=True)
    linear = run(trained, Mode.SELF_SPEC, prompts, block_length=8, max_new_tokens=64, ignore_eos=True)
    per_pass = lambda rs: sum(r.stats.num_generated for r in rs) / sum(r.stats.num_passes for r in rs)  # noqa: E731
    assert per_pass(quad) > per_pass(linear)
    assert per_pass(quad) >= 2.0


def _first_cycle(ck, block_length=4):
    """An engine whose sequences hold their first token, and the quadratic chunk of their first cycle."""
    prompts = prompts_of(ck)
    settings = GenerationSettings(mode=Mode.QUADRATIC, block_length=block_length)
    engine = engine_for(ck.model, prompts, settings)
    seqs = [engine.add(p, settings.sampling, settings.decoding) for p in prompts]
    engine.step()  # prefill
    batch = Batch(engine.runner, seqs)
    policy = engine.policies[Mode.QUADRATIC]
    chain = policy.chain(batch, block_length)
    chunk = quadratic_tokens(chain, ck.model.spec.mask_token_id)
    return batch, chain, chunk


@pytest.mark.parametrize("name", ["tiny_adapter", "tiny_wide_adapter"])
def test_the_adapter_drafts_the_masks_and_never_touches_the_chain(request, name):
    """The verify chain's logits are a verify pass's (adapter off); the masks' differ with the adapter."""
    ck = request.getfixturevalue(name)
    batch, chain, chunk = _first_cycle(ck)
    quad = batch.run(PassKind.QUADRATIC, chunk).logits
    verify = batch.run(PassKind.VERIFY, chain).logits
    torch.testing.assert_close(quad[:, :4], verify, rtol=1e-4, atol=1e-4)
    assert ck.model.has_draft_adapter
    without = _without_adapter(ck.model, lambda: batch.run(PassKind.QUADRATIC, chunk).logits)
    torch.testing.assert_close(without[:, :4], quad[:, :4], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(without[:, 4:], quad[:, 4:])


def _without_adapter(model, fn):
    saved = {}
    for i, layer in enumerate(model.encoder.layers):
        for name, owner in DRAFT_LINEARS.items():
            saved[i, name] = getattr(getattr(layer, owner), f"{name}_draft")
            setattr(getattr(layer, owner), f"{name}_draft", None)
    try:
        return fn()
    finally:
        for (i, name), twin in saved.items():
            setattr(getattr(model.encoder.layers[i], DRAFT_LINEARS[name]), f"{name}_draft", twin)


def test_sampling_is_per_sequence(tiny):
    """At T > 0 a sequence's tokens depend on its seed alone, not on what shares its batch."""
    prompts = prompts_of(tiny)
    kw = dict(block_length=4, temperature=0.8, seed=7, ignore_eos=True)
    batched = run(tiny, Mode.QUADRATIC, prompts, **kw)
    alone = [run(tiny, Mode.QUADRATIC, [p], **kw)[0] for p in prompts]
    assert tokens_of(batched) == tokens_of(alone)
    assert tokens_of(batched) != tokens_of(run(tiny, Mode.QUADRATIC, prompts, **{**kw, "seed": 8}))


def test_a_request_needs_room_for_the_whole_chunk(tiny):
    """A cycle writes W(W+1) positions (the masks' K/V are scratch): the engine refuses what cannot fit."""
    engine = Engine(tiny.model, EngineConfig(max_slots=1, max_seq_len=64))
    settings = GenerationSettings(mode=Mode.QUADRATIC, block_length=8, max_new_tokens=8)
    with pytest.raises(InputError, match="one cycle"):
        engine.add([1, 2, 3], settings.sampling, settings.decoding)  # 3 + 8 + 72 > 64
    ar = GenerationSettings(mode=Mode.AR, max_new_tokens=8)
    engine.add([1, 2, 3], ar.sampling, ar.decoding)
