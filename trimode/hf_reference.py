"""transformers' own Ministral3 with an NLD checkpoint's weights: the independent oracle for the
reference model's causal logits (tests) and the baseline of the CPU benchmark."""

from __future__ import annotations

from trimode.errors import MissingDependencyError
from trimode.model import NLDModel


def ministral3_from(model: NLDModel, attn_implementation: str = "sdpa"):
    """A Ministral3ForCausalLM (fp32, eval) built from model.spec with the same weights, renamed
    encoder.* -> model.*, diffusion_head -> lm_head. The draft adapter has no counterpart there."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "hf") from None
    transformers.logging.set_verbosity_error()  # e.g. its note on a small YaRN original context
    spec = model.spec
    config = transformers.Ministral3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": spec.rope.rope_type, **spec.rope.to_dict()},
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_ids[0],
        pad_token_id=spec.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    hf = transformers.Ministral3ForCausalLM(config).eval()
    renamed = {
        name.replace("encoder.", "model.", 1).replace("diffusion_head.", "lm_head."): t.float()
        for name, t in model.state_dict().items()
        if "_draft." not in name
    }  # the draft twins
    missing, unexpected = hf.load_state_dict(renamed, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf
