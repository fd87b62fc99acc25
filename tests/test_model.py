"""The reference model against transformers' own Ministral3, and the cache invariants."""

from __future__ import annotations

import pytest
import torch

from trimode.checkpoint import load_checkpoint
from trimode.hf_reference import ministral3_from
from trimode.make_checkpoint import make_random_checkpoint, tiny_spec
from trimode.passes import PassKind

from tolerance import forward_bound

pytestmark = pytest.mark.numerics  # rerun on another CPU kernel path (Makefile)


@pytest.mark.parametrize(
    "rope",
    [
        {},  # yarn, mscale only
        {"mscale": 1.0, "mscale_all_dim": 1.0},  # yarn as Ministral3 ships it
        {"factor": 16.0, "original_max_position_embeddings": 16, "llama_4_scaling_beta": 0.3},
    ],
)
def test_causal_logits_match_transformers_ministral3(tmp_path, rope):
    import dataclasses

    spec = tiny_spec()
    spec = dataclasses.replace(spec, rope=dataclasses.replace(spec.rope, **rope))
    ck = load_checkpoint(make_random_checkpoint(tmp_path / "c", spec=spec, init_std=0.1))
    hf = ministral3_from(ck.model, attn_implementation="eager")
    length = 3 * spec.rope.original_max_position_embeddings + 5  # crosses the Llama-4 scaling steps
    tokens = torch.randint(5, spec.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        cache = ck.model.new_cache(2, length)
        ours = ck.model(tokens, cache, PassKind.PREFILL)
        # the same logits one token at a time through the cache
        cache = ck.model.new_cache(2, length)
        stepped = []
        for i in range(length):
            stepped.append(ck.model(tokens[:, i : i + 1], cache, PassKind.PREFILL))
            cache.advance(torch.arange(2), 1)
        stepped = torch.cat(stepped, dim=1)
    assert expected.abs().max() > 0.1
    atol = forward_bound(expected, spec, span=length)  # transformers' eager attention sums in its own order
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=atol, rtol=0)


def test_masked_forward_with_a_causal_mask_equals_the_cached_forward(tiny):
    """The training path (explicit mask, no cache) and the runtime path are one model."""
    tokens = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, -1)
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, -1, -1)
    with torch.no_grad():
        masked = tiny.model.forward_masked(tokens, positions, causal)
        cached = tiny.model(tokens, tiny.model.new_cache(2, 12), PassKind.PREFILL)
    # the masked path attends over an explicit mask, the cached one over the cache: another order
    torch.testing.assert_close(masked, cached, atol=forward_bound(cached, tiny.model.spec, span=12), rtol=0)
