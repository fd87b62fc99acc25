"""The reference model against transformers' own Ministral3, and the cache invariants."""

from __future__ import annotations

import pytest
import torch

from trimode.checkpoint import load_checkpoint
from trimode.make_checkpoint import make_random_checkpoint, tiny_spec
from trimode.model import Pattern

TOLERANCE = 2e-4  # fp32 logits of magnitude ~1: differences are reduction-order noise


def hf_ministral3(ck):
    transformers = pytest.importorskip("transformers")
    spec = ck.spec
    config = transformers.Ministral3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": spec.rope.rope_type, **spec.rope.to_dict()},
        bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_ids[0], pad_token_id=spec.pad_token_id,
    )
    config._attn_implementation = "eager"
    model = transformers.Ministral3ForCausalLM(config).eval()
    renamed = {}
    for name, tensor in ck.model.state_dict().items():
        name = name.replace("encoder.", "model.", 1).replace("diffusion_head.", "lm_head.")
        renamed[name] = tensor.float()
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("rope", [
    {},                                                   # yarn, mscale only
    {"mscale": 1.0, "mscale_all_dim": 1.0},               # yarn as Ministral3 ships it
    {"factor": 16.0, "original_max_position_embeddings": 16, "llama_4_scaling_beta": 0.3},
])
def test_causal_logits_match_transformers_ministral3(tmp_path, rope):
    import dataclasses
    spec = tiny_spec()
    spec = dataclasses.replace(spec, rope=dataclasses.replace(spec.rope, **rope))
    ck = load_checkpoint(make_random_checkpoint(tmp_path / "c", spec=spec, init_std=0.1))
    hf = hf_ministral3(ck)
    length = 3 * spec.rope.original_max_position_embeddings + 5  # crosses the Llama-4 scaling steps
    tokens = torch.randint(5, spec.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        cache = ck.model.new_cache(2, length)
        ours = ck.model(tokens, cache, Pattern.CAUSAL)
        # the same logits one token at a time through the cache
        cache = ck.model.new_cache(2, length)
        stepped = []
        for i in range(length):
            stepped.append(ck.model(tokens[:, i:i + 1], cache, Pattern.CAUSAL))
            cache.advance(torch.arange(2), 1)
        stepped = torch.cat(stepped, dim=1)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(ours, expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=TOLERANCE, rtol=0)


def test_masked_forward_with_a_causal_mask_equals_the_cached_forward(tiny):
    """The training path (explicit mask, no cache) and the runtime path are one model."""
    tokens = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, -1)
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, -1, -1)
    with torch.no_grad():
        masked = tiny.model.forward_masked(tokens, positions, causal)
        cached = tiny.model(tokens, tiny.model.new_cache(2, 12), Pattern.CAUSAL)
    torch.testing.assert_close(masked, cached, atol=1e-5, rtol=0)
