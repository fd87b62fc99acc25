"""The embedded default checkpoint: the NLD layout on disk, and trained behaviour worth shipping."""

from __future__ import annotations

import json

import pytest
import torch

from trimode.cli import EMBEDDED_CHECKPOINT
from trimode.decoding import GenerationSettings, Mode, generate
from trimode.evaluate import agreement, held_out_prompts, held_out_stream, perplexity

from tolerance import forward_bound


def test_layout_on_disk():
    config = json.loads((EMBEDDED_CHECKPOINT / "config.json").read_text())
    assert config["model_type"] == "nemotron_labs_diffusion"
    assert config["torch_dtype"] == "bfloat16"
    assert (config["mask_token_id"], config["bos_token_id"], config["eos_token_id"]) == (4, 1, 2)
    size = (EMBEDDED_CHECKPOINT / "model.safetensors").stat().st_size
    assert 1e6 < size < 30e6
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "eval.json", "training_log.json"):
        assert (EMBEDDED_CHECKPOINT / name).is_file(), name


def test_mask_token_is_special(trained):
    ids = trained.tokenizer.encode_plain("<mask> x = 1")
    assert ids[0] == trained.spec.mask_token_id
    assert trained.tokenizer.decode([trained.spec.mask_token_id]) == ""


@pytest.fixture(scope="module")
def prompts(trained):
    return held_out_prompts(held_out_stream(trained), 4, 48)


def test_held_out_perplexity_is_that_of_a_trained_model(trained):
    ppl = perplexity(trained, held_out_stream(trained), 256, max_windows=16)
    assert ppl < 0.05 * trained.spec.vocab_size  # uniform guessing would be vocab_size


@pytest.mark.parametrize("block_length", [4, 8, 16])
def test_drafts_are_accepted(trained, prompts, block_length):
    """Trained drafts agree with the verifier: well over one token per draft/verify cycle."""
    settings = GenerationSettings(mode=Mode.SELF_SPEC, block_length=block_length, max_new_tokens=48, ignore_eos=True)
    results = generate(trained.model, prompts, settings)
    accepted = [n for r in results for n in r.stats.accepted_lengths]
    assert sum(accepted) / len(accepted) > 1.5
    ar = generate(trained.model, prompts, GenerationSettings(mode=Mode.AR, max_new_tokens=48, ignore_eos=True))
    assert [r.tokens for r in results] == [r.tokens for r in ar]


def test_diffusion_tracks_ar(trained, prompts):
    """Trained diffusion blocks start the way AR continues, and confident positions commit together."""

    def run(**kw):
        return generate(trained.model, prompts, GenerationSettings(max_new_tokens=48, ignore_eos=True, **kw))

    ar, diffusion = run(mode=Mode.AR), run(mode=Mode.DIFFUSION, block_length=8)
    assert agreement(diffusion, ar)["mean_common_prefix"] >= 2.0  # random weights: ~0
    low = run(mode=Mode.DIFFUSION, block_length=8, threshold=0.3)
    assert sum(r.stats.num_generated for r in low) > sum(r.stats.num_passes for r in low)
    assert all(trained.spec.mask_token_id not in r.tokens for r in low)


def test_draft_passes_differ_from_causal_passes(trained):
    """Causal logit 0 sees token 0 alone; the block pattern lets it see the whole chunk."""
    from trimode.passes import PassKind

    tokens = torch.tensor([trained.tokenizer.encode("def f(x):\n    return x")])
    with torch.no_grad():
        causal = trained.model(tokens, trained.model.new_cache(1, 32), PassKind.VERIFY)
        block = trained.model(tokens, trained.model.new_cache(1, 32), PassKind.DENOISE)
        alone = trained.model(tokens[:, :1], trained.model.new_cache(1, 32), PassKind.DECODE)
    # one key either way; the chunk of several rows may take another GEMM kernel than one row
    torch.testing.assert_close(causal[:, 0], alone[:, 0], atol=forward_bound(alone, trained.spec, span=1), rtol=0)
    assert not torch.allclose(causal[:, 0], block[:, 0], atol=1e-2)
