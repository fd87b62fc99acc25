"""The decoders' invariants (spec §5-§7, §10) on tiny random checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trimode.decoding import GenerationSettings, Mode, engine_for, generate
from trimode.decoding.batch import Batch
from trimode.decoding.self_spec import SelfSpecPolicy
from trimode.model import DRAFT_LINEARS, draft_twins

from tolerance import forward_bound

MODES = [Mode.AR, Mode.DIFFUSION, Mode.SELF_SPEC]
TEXTS = [
    "def generate(prompt, max_new_tokens=32):",
    "The quick brown fox",
    "A",
    "Self-speculation drafts a block by diffusion and verifies it autoregressively",
]


def prompts_of(ck, texts=TEXTS):
    return [ck.tokenizer.encode(t) for t in texts]


def tokens_of(results):
    return [r.tokens for r in results]


def run(ck, mode, prompts, **kw):
    kw.setdefault("max_new_tokens", 40)
    return generate(ck.model, prompts, GenerationSettings(mode=mode, **kw))


@pytest.fixture(params=["tiny", "tiny_adapter", "tiny_wide_adapter", "trained"])
def ck(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("block_length", [4, 8, 32])
@pytest.mark.parametrize("batched", [False, True])
def test_self_spec_greedy_equals_ar(ck, block_length, batched):
    prompts = prompts_of(ck)
    ar = run(ck, Mode.AR, prompts)
    if batched:
        spec = run(ck, Mode.SELF_SPEC, prompts, block_length=block_length)
    else:
        spec = [run(ck, Mode.SELF_SPEC, [p], block_length=block_length)[0] for p in prompts]
    assert tokens_of(spec) == tokens_of(ar)
    for r in spec:  # 2 passes per cycle, and a cycle's tokens never exceed the block
        assert r.stats.passes["draft"] == r.stats.passes["verify"] == len(r.stats.accepted_lengths)
        assert all(1 <= n <= block_length for n in r.stats.accepted_lengths)


@pytest.mark.parametrize("name", ["tiny_adapter", "tiny_wide_adapter"])
def test_draft_adapter_changes_the_draft_only(request, name):
    """The adapter is on in draft passes only: outputs still equal AR (test above), drafts differ
    without it, and an adapter on every linear drafts differently from its o_proj twins alone."""
    ck = request.getfixturevalue(name)
    prompts = prompts_of(ck)
    model = ck.model
    settings = GenerationSettings(mode=Mode.SELF_SPEC, block_length=8)
    engine = engine_for(model, prompts, settings)
    seqs = [engine.add(p, settings.sampling, settings.decoding) for p in prompts]
    engine.step()  # prefill: every sequence has its first token
    batch = Batch(engine.runner, seqs)
    twins = draft_twins(model)

    def drafts_with(kept: set) -> torch.Tensor:
        owners = {key: getattr(model.encoder.layers[key[0]], DRAFT_LINEARS[key[1]]) for key in twins}
        try:
            for key, owner in owners.items():
                setattr(owner, f"{key[1]}_draft", twins[key] if key in kept else None)
            return SelfSpecPolicy().draft(batch, settings.decoding)
        finally:
            for key, owner in owners.items():
                setattr(owner, f"{key[1]}_draft", twins[key])

    with_adapter = drafts_with(set(twins))
    assert not torch.equal(with_adapter, drafts_with(set()))
    if name == "tiny_wide_adapter":
        assert not torch.equal(with_adapter, drafts_with({k for k in twins if k[1] == "o_proj"}))


class OracleDraft(SelfSpecPolicy):
    """Drafts the AR greedy continuation, made wrong from draft index `wrong_at` on."""

    def __init__(self, reference: list[list[int]], wrong_at: int):
        self.reference, self.wrong_at = reference, wrong_at

    def draft(self, batch, config):
        block = torch.zeros(len(batch), batch.block_length, dtype=torch.long)
        for j, seq in enumerate(batch.seqs):
            done = len(seq.tokens)  # the seed is reference[done - 1]
            draft = self.reference[seq.id][done - 1 : done + block.shape[1] - 1]
            draft += [5] * (block.shape[1] - len(draft))  # past max_new_tokens: anything
            for i in range(1 + self.wrong_at, len(draft)):
                draft[i] = (draft[i] + 1) % batch.spec.vocab_size
            block[j] = torch.tensor(draft)
        return block


@pytest.mark.parametrize("wrong_at, expected_n", [(99, 8), (0, 1), (3, 4)])
def test_accept_keeps_matched_prefix_plus_bonus(tiny, wrong_at, expected_n):
    prompts = prompts_of(tiny)
    ar = tokens_of(run(tiny, Mode.AR, prompts, max_new_tokens=41, ignore_eos=True))
    settings = GenerationSettings(mode=Mode.SELF_SPEC, block_length=8, max_new_tokens=41, ignore_eos=True)
    engine = engine_for(tiny.model, prompts, settings)
    engine.policies[Mode.SELF_SPEC] = OracleDraft(ar, wrong_at)
    results = [engine.add(p, settings.sampling, settings.decoding) for p in prompts]
    while engine.has_work:
        engine.step()
    assert tokens_of(results) == ar
    for r in results:
        full_cycles = r.stats.accepted_lengths[:-1]  # the last cycle may run into max_new_tokens
        assert full_cycles and all(n == expected_n for n in full_cycles)


def test_diffusion_block_length_one_equals_ar(ck):
    prompts = prompts_of(ck)
    diff = run(ck, Mode.DIFFUSION, prompts, block_length=1)
    assert tokens_of(diff) == tokens_of(run(ck, Mode.AR, prompts))
    assert all(r.stats.passes["denoise"] == 0 for r in diff)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_equals_one_shot(tiny, mode, chunk):
    prompts = prompts_of(tiny)
    one_shot = run(tiny, mode, prompts, block_length=4)
    chunked = run(tiny, mode, prompts, block_length=4, prefill_chunk=chunk)
    assert tokens_of(chunked) == tokens_of(one_shot)
    longest = max(len(p) for p in prompts)
    assert max(r.stats.passes["prefill"] for r in chunked) == -(-longest // chunk)


@pytest.mark.numerics
def test_cropped_cache_rerun_equals_fresh_run(tiny):
    """Writing K/V past a sequence's length, then cropping and re-running, is the same as never writing it."""
    from trimode.passes import PassKind

    model = tiny.model
    g = torch.Generator().manual_seed(0)
    prefix, junk, tail = (torch.randint(5, 300, (2, n), generator=g) for n in (9, 6, 5))
    rows = torch.arange(2)
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model(torch.cat([prefix, junk], 1), cache, PassKind.PREFILL)
        cache.advance(rows, 15)
        cache.crop(rows, torch.tensor([9, 9]))
        model(junk[:, :4], cache, PassKind.DENOISE)  # scratch K/V from a block pass, too
        cropped = model(tail, cache, PassKind.VERIFY)
        fresh_cache = model.new_cache(2, 32)
        model(prefix, fresh_cache, PassKind.PREFILL)
        fresh_cache.advance(rows, 9)
        fresh = model(tail, fresh_cache, PassKind.VERIFY)
    # same keys, other pool history: only the span's summation order may differ
    torch.testing.assert_close(cropped, fresh, atol=forward_bound(fresh, model.spec, span=32), rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_one_by_one(ck, mode):
    prompts = prompts_of(ck)
    batched = run(ck, mode, prompts, block_length=8)
    single = [run(ck, mode, [p], block_length=8)[0] for p in prompts]
    assert tokens_of(batched) == tokens_of(single)
    assert [r.stats.to_dict() for r in batched] == [r.stats.to_dict() for r in single]


@pytest.mark.parametrize("mode", MODES)
def test_seeded_sampling_is_reproducible(tiny, mode):
    prompts = prompts_of(tiny)
    a = run(tiny, mode, prompts, temperature=1.0, seed=7, block_length=4)
    b = run(tiny, mode, prompts, temperature=1.0, seed=7, block_length=4)
    c = run(tiny, mode, prompts, temperature=1.0, seed=8, block_length=4)
    greedy = run(tiny, mode, prompts, block_length=4)
    assert tokens_of(a) == tokens_of(b)
    assert tokens_of(a) != tokens_of(c)
    assert tokens_of(a) != tokens_of(greedy)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_new_tokens", [1, 5, 13])
def test_max_new_tokens_is_exact(tiny, mode, max_new_tokens):
    results = run(tiny, mode, prompts_of(tiny), max_new_tokens=max_new_tokens, block_length=4, ignore_eos=True)
    assert all(len(r.tokens) == max_new_tokens and r.finish_reason == "length" for r in results)


@pytest.mark.parametrize("mode", MODES)
def test_stop_token_ends_each_sequence_on_its_own(tiny, mode):
    """Take a token the mode emits mid-way in sequence 0 as a stop token: every sequence ends at its
    first occurrence (inclusive) with the same tokens before it, while the others go on."""
    prompts = prompts_of(tiny)
    reference = tokens_of(run(tiny, mode, prompts, ignore_eos=True, block_length=4))
    stop = next(t for t in reference[0][5:] if t not in reference[0][:5])
    expected = [seq[: seq.index(stop) + 1] if stop in seq else seq for seq in reference]
    results = run(tiny, mode, prompts, stop_token_ids=(stop,), block_length=4)
    assert tokens_of(results) == expected
    assert results[0].finish_reason == "eos"
    assert any(r.finish_reason == "length" for r in results)
    if mode == Mode.SELF_SPEC:
        assert tokens_of(results) == tokens_of(run(tiny, Mode.AR, prompts, stop_token_ids=(stop,)))


@pytest.mark.parametrize(
    "threshold, top_k, expected_passes_per_block",
    [
        (0.0, False, 1),  # every mask committed from one pass
        (1.0, False, 7),  # only the forced most-confident token per pass (probabilities < 1)
        (None, True, 7),  # even split of 7 masks over 8 steps: 1 per step
    ],
)
def test_diffusion_commit_rules(tiny, threshold, top_k, expected_passes_per_block):
    results = run(
        tiny,
        Mode.DIFFUSION,
        prompts_of(tiny)[:1],
        block_length=8,
        max_new_tokens=33,
        threshold=threshold,
        use_top_k_schedule=top_k,
        ignore_eos=True,
    )
    stats = results[0].stats
    assert stats.passes["refresh"] == 4  # 1 seed + 4 blocks x 8 tokens = 33: no refresh after the last
    assert stats.passes["denoise"] == 4 * expected_passes_per_block


def test_threshold_between_commits_several_per_pass(tiny):
    results = run(
        tiny, Mode.DIFFUSION, prompts_of(tiny)[:1], block_length=8, max_new_tokens=33, threshold=0.05, ignore_eos=True
    )
    assert 4 <= results[0].stats.passes["denoise"] < 4 * 7


def test_statistics_count_every_pass(tiny):
    prompts = prompts_of(tiny)
    ar = run(tiny, Mode.AR, prompts, ignore_eos=True)
    assert all(r.stats.tokens_per_pass == 1.0 for r in ar)
    spec = run(tiny, Mode.SELF_SPEC, prompts, ignore_eos=True, block_length=4)
    for r in spec:
        assert r.stats.num_passes == 1 + 2 * len(r.stats.accepted_lengths)
        assert sum(r.stats.accepted_lengths) + 1 >= r.stats.num_generated


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("block_length", 0),
        ("temperature", -1.0),
        ("threshold", 1.5),
        ("prefill_chunk", 0),
        ("mode", "beam"),
    ],
)
def test_bad_settings_name_the_field(field, value):
    from trimode.errors import InputError

    with pytest.raises(InputError, match=field):
        GenerationSettings(**{field: value})


def test_mask_token_is_never_emitted(tiny):
    """Even when the head favours the mask token, it is excluded from every pick (spec §10)."""
    model = tiny.model
    saved = model.diffusion_head.weight.clone()
    try:
        model.diffusion_head.weight[tiny.spec.mask_token_id] += 5.0
        for mode in MODES:
            results = run(tiny, mode, prompts_of(tiny), block_length=4, ignore_eos=True, max_new_tokens=12)
            assert all(tiny.spec.mask_token_id not in r.tokens for r in results)
    finally:
        model.diffusion_head.weight.copy_(saved)


def test_generation_settings_are_frozen():
    s = GenerationSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_new_tokens = 3
