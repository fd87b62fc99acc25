"""The pure-torch references of the three hot-path ops, on hand-built inputs."""

from __future__ import annotations

import pytest
import torch

from trimode.plugins.reference import ChunkLayout, block_attention, diffusion_commit, pick_tokens, spec_accept

MASK = 0


def one_hot_logits(tokens: list[list[int]], vocab: int = 8, high: float = 5.0) -> torch.Tensor:
    logits = torch.zeros(len(tokens), len(tokens[0]), vocab)
    for b, row in enumerate(tokens):
        for i, t in enumerate(row):
            logits[b, i, t] = high
    return logits


@pytest.mark.parametrize("verify, draft, expected_n", [
    ([3, 4, 5, 6], [1, 3, 4, 5], 4),  # all L-1 drafts match: L tokens
    ([3, 4, 5, 6], [1, 2, 4, 5], 1),  # first draft wrong: the bonus token only
    ([3, 4, 7, 6], [1, 3, 4, 5], 3),  # two match, then a mismatch
    ([3, 9, 5, 6], [1, 3, 4, 5], 2),  # a later match after a mismatch does not count
])
def test_spec_accept(verify, draft, expected_n):
    a, n, seed, is_eos = spec_accept(one_hot_logits([verify], vocab=10), torch.tensor([draft]), MASK,
                                     torch.tensor([6]))
    assert a[0].tolist() == verify and n.tolist() == [expected_n]
    assert seed.tolist() == [verify[expected_n - 1]] and is_eos.tolist() == [expected_n == 4]


def test_argmax_ties_take_the_lowest_id_and_never_the_mask():
    logits = torch.tensor([[[9.0, 1.0, 3.0, 3.0]]])
    assert pick_tokens(logits, MASK, 0.0).item() == 2


def test_diffusion_commit_threshold_commits_the_best_and_the_confident():
    block = torch.tensor([[7, MASK, MASK, MASK]])
    logits = torch.zeros(1, 4, 8)
    logits[0, 1, 3] = 2.0    # p ~ 0.51
    logits[0, 2, 4] = 10.0   # p ~ 0.997
    logits[0, 3, 5] = 9.0    # p ~ 0.99
    new = diffusion_commit(logits, block, MASK, 0.98, None)
    assert new.tolist() == [[7, MASK, 4, 5]]
    new = diffusion_commit(logits, block, MASK, 1.0, None)  # only the most confident
    assert new.tolist() == [[7, MASK, 4, MASK]]
    new = diffusion_commit(logits, block, MASK, None, torch.tensor([2]))  # top-2
    assert new.tolist() == [[7, MASK, 4, 5]]


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("L, prefix_lengths", [(3, [0, 5]), (3, [4, 4]), (1, [4, 4]), (1, [2, 0])])
def test_block_attention_matches_dense_masked_attention(is_causal, L, prefix_lengths):
    g = torch.Generator().manual_seed(0)
    b, H, Hkv, D, S = 2, 4, 2, 8, 16
    lengths = torch.tensor(prefix_lengths)
    k_cache, v_cache = torch.randn(b, Hkv, S, D, generator=g), torch.randn(b, Hkv, S, D, generator=g)
    q, k, v = torch.randn(b, L, H, D, generator=g), torch.randn(b, L, Hkv, D, generator=g), \
        torch.randn(b, L, Hkv, D, generator=g)
    prefix_k, prefix_v = k_cache.clone(), v_cache.clone()
    out = block_attention(q, k, v, k_cache, v_cache, ChunkLayout.build(lengths, None, L, is_causal))
    for row in range(b):
        c = int(lengths[row])
        assert torch.equal(k_cache[row, :, c:c + L], k[row].transpose(0, 1))  # chunk K/V written at c
        keys = torch.cat([prefix_k[row, :, :c], k[row].transpose(0, 1)], 1).repeat_interleave(H // Hkv, 0)
        values = torch.cat([prefix_v[row, :, :c], v[row].transpose(0, 1)], 1).repeat_interleave(H // Hkv, 0)
        scores = q[row].transpose(0, 1) @ keys.transpose(1, 2) / D ** 0.5  # [H, L, c+L]
        if is_causal:
            visible = torch.arange(c + L)[None] <= c + torch.arange(L)[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        expected = (scores.softmax(-1) @ values).transpose(0, 1)
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)
