"""The pure-torch references of the three hot-path ops, on hand-built inputs."""

from __future__ import annotations

import pytest
import torch

from trimode.plugins.reference import (
    ChunkLayout,
    block_attention,
    diffusion_commit,
    philox_uniform,
    pick_tokens,
    sampling_rows,
    spec_accept,
)

from tolerance import attention_accumulations, bound

pytestmark = pytest.mark.numerics  # rerun on another CPU kernel path (Makefile)

MASK = 0


def one_hot_logits(tokens: list[list[int]], vocab: int = 8, high: float = 5.0) -> torch.Tensor:
    logits = torch.zeros(len(tokens), len(tokens[0]), vocab)
    for b, row in enumerate(tokens):
        for i, t in enumerate(row):
            logits[b, i, t] = high
    return logits


@pytest.mark.parametrize(
    "verify, draft, expected_n",
    [
        ([3, 4, 5, 6], [1, 3, 4, 5], 4),  # all L-1 drafts match: L tokens
        ([3, 4, 5, 6], [1, 2, 4, 5], 1),  # first draft wrong: the bonus token only
        ([3, 4, 7, 6], [1, 3, 4, 5], 3),  # two match, then a mismatch
        ([3, 9, 5, 6], [1, 3, 4, 5], 2),  # a later match after a mismatch does not count
    ],
)
def test_spec_accept(verify, draft, expected_n):
    a, n, seed, is_eos = spec_accept(one_hot_logits([verify], vocab=10), torch.tensor([draft]), MASK, torch.tensor([6]))
    assert a[0].tolist() == verify and n.tolist() == [expected_n]
    assert seed.tolist() == [verify[expected_n - 1]] and is_eos.tolist() == [expected_n == 4]


def test_argmax_ties_take_the_lowest_id_and_never_the_mask():
    logits = torch.tensor([[[9.0, 1.0, 3.0, 3.0]]])
    assert pick_tokens(logits, MASK, 0.0).item() == 2


# --- per-row sampling --------------------------------------------------------------------------------


def sampling_case(case: int, length: int = 3, vocab: int = 23):
    """A random batch (b in 1..6) of flat logits, per-row temperatures (some rows greedy) and seeds."""
    g = torch.Generator().manual_seed(case)
    b = int(torch.randint(1, 7, (1,), generator=g))
    logits = torch.randn(b, length, vocab, generator=g)
    temperature = torch.rand(b, generator=g) * 2
    temperature[torch.rand(b, generator=g) < 0.4] = 0.0
    seed = torch.randint(0, 2**63 - 1, (b,), generator=g)
    return logits, temperature, seed


def test_philox_matches_the_random123_known_answer():
    """Philox4x32-10, key 0, counter 0 -> first word 0x6627e8d5 (Random123's kat_vectors)."""
    assert philox_uniform(torch.tensor([0]), 1).item() == torch.tensor(0x6627E8D5 * 4.6566127342e-10).item()


@pytest.mark.parametrize("case", range(6))
def test_a_row_samples_the_same_tokens_alone_or_in_any_batch(case):
    logits, temperature, seed = sampling_case(case)
    block = torch.full(logits.shape[:2], MASK)
    draft = torch.randint(1, logits.shape[2], logits.shape[:2], generator=torch.Generator().manual_seed(case))
    eos_ids = torch.tensor([3])
    tokens = pick_tokens(logits, MASK, temperature, seed)
    accepted = spec_accept(logits, draft, MASK, eos_ids, temperature, seed)
    new = diffusion_commit(logits, block, MASK, 0.5, None, temperature, seed)
    for r in range(logits.shape[0]):
        alone = slice(r, r + 1)
        args = (temperature[alone], seed[alone])
        assert torch.equal(pick_tokens(logits[alone], MASK, *args), tokens[alone])
        assert all(
            torch.equal(x, y[alone])
            for x, y in zip(spec_accept(logits[alone], draft[alone], MASK, eos_ids, *args), accepted)
        )
        assert torch.equal(diffusion_commit(logits[alone], block[alone], MASK, 0.5, None, *args), new[alone])
        if temperature[r] == 0:  # greedy rows: the argmax, no noise
            assert torch.equal(tokens[r], logits[r].index_fill(-1, torch.tensor([MASK]), -torch.inf).argmax(-1))
    # the batch is reordered: each row keeps its tokens
    order = torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(case))
    assert torch.equal(pick_tokens(logits[order], MASK, temperature[order], seed[order]), tokens[order])


def test_noise_is_keyed_by_the_row_seed_and_the_index_inside_the_row():
    """Equal rows with equal seeds sample equally wherever they sit; another seed samples otherwise;
    row r's scores are logits / T + Gumbel(Philox(seed[r], l*V + v))."""
    g = torch.Generator().manual_seed(9)
    row = torch.randn(1, 4, 50, generator=g)
    logits = torch.cat([torch.randn(1, 4, 50, generator=g), row, row, row])
    temperature = torch.tensor([0.0, 1.5, 1.5, 1.5])
    seed = torch.tensor([5, 2**40 + 7, 3, 2**40 + 7])
    tokens = pick_tokens(logits, MASK, temperature, seed)
    assert torch.equal(tokens[1], tokens[3]) and not torch.equal(tokens[1], tokens[2])
    u = philox_uniform(torch.tensor([2**40 + 7]), 4 * 50).view(4, 50)
    scores = row[0] * (1.0 / torch.tensor(1.5)) - torch.log(-torch.log(u))
    assert torch.equal(tokens[1], scores.index_fill(-1, torch.tensor([MASK]), -torch.inf).argmax(-1))


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.7, 11), (1.3, 2**62 + 1)])
def test_python_scalars_mean_the_same_value_for_every_row(temperature, seed):
    logits, _, _ = sampling_case(3)
    b = logits.shape[0]
    expected = pick_tokens(logits, MASK, torch.full((b,), temperature), torch.full((b,), seed))
    assert torch.equal(pick_tokens(logits, MASK, temperature, seed), expected)
    if temperature > 0:  # and the seed matters
        assert not torch.equal(pick_tokens(logits, MASK, temperature, seed + 1), expected)


@pytest.mark.parametrize(
    "temperature, seed, message",
    [
        (torch.ones(2), torch.zeros(3, dtype=torch.int64), r"seed: expected int64 \[2\]"),
        (torch.ones(2, dtype=torch.float64), 0, r"temperature: expected float32 \[2\]"),
        (torch.ones(2), torch.zeros(2, dtype=torch.int32), "seed: expected int64"),
        (1.0, -1, "outside"),
        (1.0, 2**63, "outside"),
    ],
)
def test_sampling_rows_rejects_bad_parameters(temperature, seed, message):
    with pytest.raises(ValueError, match=message):
        sampling_rows(temperature, seed, 2, "cpu")


def test_pick_does_not_write_into_the_logits():
    logits = torch.randn(2, 3, 8)
    original = logits.clone()
    pick_tokens(logits, MASK, 0.0)
    assert torch.equal(logits, original)


def test_diffusion_commit_threshold_commits_the_best_and_the_confident():
    block = torch.tensor([[7, MASK, MASK, MASK]])
    logits = torch.zeros(1, 4, 8)
    logits[0, 1, 3] = 2.0  # p ~ 0.51
    logits[0, 2, 4] = 10.0  # p ~ 0.997
    logits[0, 3, 5] = 9.0  # p ~ 0.99
    new = diffusion_commit(logits, block, MASK, 0.98, None)
    assert new.tolist() == [[7, MASK, 4, 5]]
    new = diffusion_commit(logits, block, MASK, 1.0, None)  # only the most confident
    assert new.tolist() == [[7, MASK, 4, MASK]]
    new = diffusion_commit(logits, block, MASK, None, torch.tensor([2]))  # top-2
    assert new.tolist() == [[7, MASK, 4, 5]]


@pytest.mark.parametrize("page", [None, 4, 3], ids=["dense", "paged-4", "paged-3"])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("L, prefix_lengths", [(3, [0, 5]), (3, [4, 4]), (1, [4, 4]), (1, [2, 0])])
def test_block_attention_matches_dense_masked_attention(is_causal, L, prefix_lengths, page):
    """page: the same cache rows cut into blocks of `page` positions, stored in shuffled order behind
    tables padded with a null block (kv_cache.py): the same attention, the chunk written in the blocks."""
    g = torch.Generator().manual_seed(0)
    b, H, Hkv, D, S = 2, 4, 2, 8, 12
    lengths = torch.tensor(prefix_lengths)
    k_cache, v_cache = torch.randn(b, Hkv, S, D, generator=g), torch.randn(b, Hkv, S, D, generator=g)
    q, k, v = (
        torch.randn(b, L, H, D, generator=g),
        torch.randn(b, L, Hkv, D, generator=g),
        torch.randn(b, L, Hkv, D, generator=g),
    )
    prefix_k, prefix_v = k_cache.clone(), v_cache.clone()
    if page is None:
        out = block_attention(q, k, v, k_cache, v_cache, ChunkLayout.build(lengths, None, L, is_causal))
    else:
        T = S // page
        null = b * T
        tables = torch.cat([torch.randperm(null, generator=g).view(b, T), torch.full((b, 1), null)], 1)
        pool_k, pool_v = (torch.randn(null + 1, Hkv, page, D, generator=g) for _ in range(2))
        for pool, cache in ((pool_k, k_cache), (pool_v, v_cache)):  # row i's positions t*page.. in block tables[i, t]
            pool[tables[:, :T]] = cache.view(b, Hkv, T, page, D).transpose(1, 2)
        out = block_attention(q, k, v, pool_k, pool_v, ChunkLayout.build(lengths, tables, L, is_causal))
        # the pool read back in table order: the rows, with the chunk written (the null block not read)
        k_cache, v_cache = (pool[tables[:, :T]].transpose(1, 2).reshape(b, Hkv, S, D) for pool in (pool_k, pool_v))
    for row in range(b):
        c = int(lengths[row])
        assert torch.equal(k_cache[row, :, c : c + L], k[row].transpose(0, 1))  # chunk K/V written at c
        assert torch.equal(v_cache[row, :, c : c + L], v[row].transpose(0, 1))
        assert torch.equal(k_cache[row, :, :c], prefix_k[row, :, :c])  # the prefix kept
        keys = torch.cat([prefix_k[row, :, :c], k[row].transpose(0, 1)], 1).repeat_interleave(H // Hkv, 0)
        values = torch.cat([prefix_v[row, :, :c], v[row].transpose(0, 1)], 1).repeat_interleave(H // Hkv, 0)
        scores = q[row].transpose(0, 1) @ keys.transpose(1, 2) / D**0.5  # [H, L, c+L]
        if is_causal:
            visible = torch.arange(c + L)[None] <= c + torch.arange(L)[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        expected = (scores.softmax(-1) @ values).transpose(0, 1)
        # the reference gathers keys its own way: the same sums in another order
        torch.testing.assert_close(out[row], expected, atol=bound(expected, attention_accumulations(D, c + L)), rtol=0)
