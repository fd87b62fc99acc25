"""The decoders produce the same tokens with the Triton kernels as with the references.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), routed by TRIMODE_KERNELS=triton;
on a GPU (scripts/gpu_check.sh) the same tests compile them for CUDA.
"""

from __future__ import annotations

import pytest
import torch

from trimode.decoding import GenerationSettings, Mode, generate
from trimode.plugins import ops

TEXTS = ["def generate(prompt, max_new_tokens=32):", "A", "The quick brown fox"]


def decode(ck, mode, backend, monkeypatch, **kw):
    monkeypatch.setenv(ops.KERNELS_ENV, backend)
    prompts = [ck.tokenizer.encode(t) for t in TEXTS[: kw.pop("num_prompts", len(TEXTS))]]
    settings = GenerationSettings(mode=mode, max_new_tokens=kw.pop("max_new_tokens", 8), **kw)  # two blocks of 4
    return generate(ck.model, prompts, settings)


@pytest.mark.parametrize(
    "mode, kw",
    [
        (Mode.AR, {}),
        (Mode.DIFFUSION, {"block_length": 4}),
        (Mode.DIFFUSION, {"block_length": 4, "threshold": 0.3, "temperature": 1.0, "seed": 5}),
        (Mode.DIFFUSION, {"block_length": 4, "use_top_k_schedule": True}),
        (Mode.SELF_SPEC, {"block_length": 4}),
        # sampled self-spec is the slowest under the interpreter (every draft/verify cycle samples): one row
        (Mode.SELF_SPEC, {"block_length": 8, "temperature": 0.8, "seed": 3, "num_prompts": 1}),
    ],
)
def test_kernels_give_the_reference_tokens(tiny, mode, kw, monkeypatch):
    expected = decode(tiny, mode, "reference", monkeypatch, **dict(kw))
    got = decode(tiny, mode, "triton", monkeypatch, **dict(kw))
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    assert [r.stats.to_dict() for r in got] == [r.stats.to_dict() for r in expected]


@pytest.mark.parametrize(
    "mode, batched, block_length",
    [(Mode.SELF_SPEC, False, 8), (Mode.SELF_SPEC, True, 8), (Mode.QUADRATIC, False, 4), (Mode.QUADRATIC, True, 4)],
)
def test_self_spec_equals_ar_with_kernels(trained, mode, batched, block_length, monkeypatch):
    """The invariant of spec §7 on the trained fixture, every op of (linear or quadratic)
    self-speculation through its kernel, against AR greedy through the references (AR's kernels
    equal its references: above)."""
    prompts = [trained.tokenizer.encode(t) for t in TEXTS]
    settings = dict(max_new_tokens=12, block_length=block_length)  # the interpreter is slow: a few cycles
    monkeypatch.setenv(ops.KERNELS_ENV, "reference")
    ar = generate(trained.model, prompts, GenerationSettings(mode=Mode.AR, **settings))
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    if not batched:  # batch 1: the longest prompt alone (the interpreter's time grows with each run)
        prompts, ar = prompts[:1], ar[:1]
    spec = generate(trained.model, prompts, GenerationSettings(mode=mode, **settings))
    assert [r.tokens for r in spec] == [r.tokens for r in ar]
    assert any(n > 1 for r in spec for n in r.stats.accepted_lengths)  # drafts were really accepted


def test_kernels_are_really_used(tiny, monkeypatch):
    """Guard against a silent fallback: a broken kernel must change the decoding."""
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    monkeypatch.setattr(torch.ops.trimode, "spec_accept", None)
    with pytest.raises(TypeError):
        decode(tiny, Mode.SELF_SPEC, "triton", monkeypatch, block_length=4)


@pytest.mark.parametrize("choice, expect_kernels", [("triton", True), ("reference", False)])
def test_the_runner_chooses_kernels_once_when_built(tiny, monkeypatch, choice, expect_kernels):
    """TRIMODE_KERNELS is read when the engine's runner is built; changing it later changes nothing."""
    from trimode.decoding import engine_for

    monkeypatch.setenv(ops.KERNELS_ENV, choice)
    settings = GenerationSettings(mode=Mode.SELF_SPEC, block_length=4, max_new_tokens=6)
    engine = engine_for(tiny.model, [[5, 6, 7]], settings)
    engine.add([5, 6, 7], settings.sampling, settings.decoding)
    monkeypatch.setenv(ops.KERNELS_ENV, "reference" if expect_kernels else "triton")
    monkeypatch.setattr(torch.ops.trimode, "spec_accept", None)  # a kernel call would fail
    if expect_kernels:
        with pytest.raises(TypeError):
            while engine.has_work:
                engine.step()
    else:
        while engine.has_work:
            engine.step()
    assert engine.runner.kernels is expect_kernels
