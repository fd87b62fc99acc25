"""The Python API (trimode/llm.py): LLM(...).generate / stream with SamplingParams, on the embedded
checkpoint and on a built engine dir; results equal trimode.decoding.generate's for the same settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trimode import LLM, RequestOutput, SamplingParams
from trimode.decoding import GenerationSettings, generate
from trimode.errors import InputError

MODES = ["ar", "diffusion", "self-spec"]
PROMPTS = ["def f(x):", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self"]  # ragged


@pytest.fixture(scope="module")
def llm():
    return LLM()


def test_import_trimode_does_not_import_torch():
    code = "import trimode, sys; assert 'torch' not in sys.modules; assert 'LLM' in trimode.__all__"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_embedded_checkpoint_runs_on_the_default_device(llm):
    import torch

    assert llm.built is None and llm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    (out,) = llm.generate(["def f(x):"], SamplingParams(mode="self-spec", max_tokens=16))
    assert isinstance(out, RequestOutput) and out.text and len(out.token_ids) <= 16
    assert out.finish_reason in ("eos", "length") and out.stats["num_generated"] == len(out.token_ids)


def test_self_spec_equals_ar_at_temperature_0(llm):
    ar = llm.generate(PROMPTS, SamplingParams(mode="ar", max_tokens=24))
    spec = llm.generate(PROMPTS, SamplingParams(mode="self-spec", max_tokens=24))
    assert [o.token_ids for o in spec] == [o.token_ids for o in ar]
    assert [o.text for o in spec] == [o.text for o in ar]
    assert all(o.stats["tokens_per_pass"] == 1.0 for o in ar)
    assert all(o.stats["passes"].get("verify") for o in spec)


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("ar", {}),
        ("ar", {"temperature": 0.8, "seed": 3}),
        ("diffusion", {"block_length": 4, "threshold": 0.5}),
        ("diffusion", {"threshold": "none", "prefill_chunk": 3}),
        ("self-spec", {"block_length": 4, "ignore_eos": True}),
        ("self-spec", {"temperature": 0.7, "seed": 11, "threshold": 0.2}),
    ],
)
def test_results_equal_decoding_generate(llm, mode, extra):
    params = SamplingParams(mode=mode, max_tokens=20, **extra)
    outs = llm.generate(PROMPTS, params)
    top_k = extra.get("threshold") == "none"
    settings = GenerationSettings(
        mode=mode,
        max_new_tokens=20,
        temperature=extra.get("temperature", 0.0),
        seed=extra.get("seed", 0),
        block_length=extra.get("block_length"),
        threshold=None if top_k else extra.get("threshold"),
        use_top_k_schedule=top_k,
        prefill_chunk=extra.get("prefill_chunk"),
        ignore_eos=extra.get("ignore_eos", False),
    )
    assert params.to_settings() == settings
    encoded = [llm.tokenizer.encode(p) for p in PROMPTS]
    seqs = generate(llm.checkpoint.model, encoded, settings)
    assert [o.prompt for o in outs] == PROMPTS and [o.prompt_token_ids for o in outs] == encoded
    assert [o.token_ids for o in outs] == [s.tokens for s in seqs]
    assert [o.text for o in outs] == [llm.tokenizer.decode(s.tokens) for s in seqs]
    assert [o.finish_reason for o in outs] == [s.finish_reason for s in seqs]
    assert [o.stats for o in outs] == [s.stats.to_dict() for s in seqs]


def test_a_str_is_one_prompt_and_params_default(llm):
    outs = llm.generate("def f(x):")
    assert isinstance(outs, list) and len(outs) == 1
    assert outs[0].token_ids == llm.generate(["def f(x):"], SamplingParams())[0].token_ids
    assert len(outs[0].token_ids) <= SamplingParams().max_tokens


@pytest.mark.parametrize("mode", MODES)
def test_stream_concatenates_to_the_generated_text(llm, mode):
    params = SamplingParams(mode=mode, max_tokens=32, ignore_eos=True)
    pieces = list(llm.stream(PROMPTS[1], params))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == llm.generate(PROMPTS[1], params)[0].text


def test_on_step_reports_each_prompts_new_tokens(llm):
    got: dict[int, list[int]] = {0: [], 1: []}
    outs = llm.generate(
        PROMPTS,
        SamplingParams(mode="self-spec", max_tokens=12),
        on_step=lambda new: [got[i].extend(t) for i, t in new.items()],
    )
    assert [got[0], got[1]] == [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def engine_llm(tiny_engine_dir):
    return LLM(tiny_engine_dir)


@pytest.mark.parametrize("mode", MODES)
def test_an_engine_dir_gives_the_tokens_of_its_eager_checkpoint(engine_llm, tiny_engine_dir, mode):
    assert engine_llm.built is not None and engine_llm.device.type == "cpu"  # the engine's device
    eager = LLM(tiny_engine_dir / "checkpoint", device="cpu")
    assert eager.built is None
    params = SamplingParams(mode=mode, max_tokens=12, ignore_eos=True)
    outs = engine_llm.generate(["ab", "hello world"], params)  # default block length: the engine's (4)
    assert [o.block_length for o in outs] == [4, 4] and [len(o.token_ids) for o in outs] == [12, 12]
    expected = eager.generate(
        ["ab", "hello world"], SamplingParams(mode=mode, max_tokens=12, ignore_eos=True, block_length=4)
    )
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert "".join(engine_llm.stream("ab", params)) == outs[0].text


def test_an_engine_dir_refuses_what_it_fixed_at_build_time(engine_llm):
    with pytest.raises(InputError, match="prefill_chunk"):
        engine_llm.generate("ab", SamplingParams(prefill_chunk=2))
    with pytest.raises(InputError, match="block length 8: this engine was built for block lengths 4"):
        engine_llm.generate("ab", SamplingParams(mode="diffusion", block_length=8, max_tokens=12))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mode": "beam"}, "mode"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"threshold": 2}, "threshold"),
        ({"threshold": "all"}, "threshold"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"block_length": 0}, "block_length"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"prefill_chunk": 0}, "prefill_chunk"),
    ],
)
def test_bad_params_raise_input_error_naming_the_parameter(kwargs, name):
    with pytest.raises(InputError, match=f"^{name}: "):
        SamplingParams(**kwargs)


def test_threshold_none_is_the_top_k_schedule():
    settings = SamplingParams(mode="diffusion", threshold="None").to_settings()
    assert settings.use_top_k_schedule and settings.threshold is None and settings.commit_threshold is None


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda llm: llm.generate([]), "prompts"),
        (lambda llm: llm.generate(["def f(x):", ""]), "the prompt is empty"),  # as the CLI says it
        (lambda llm: llm.stream(""), "the prompt is empty"),
        (lambda llm: llm.generate(["def f(x):", 3]), r"prompts\[1\]"),
        (lambda llm: llm.generate("x", {"max_tokens": 4}), "params"),
        (lambda llm: LLM(device="tpu"), "device"),
    ],
)
def test_bad_calls_raise_input_error(llm, call, name):
    with pytest.raises(InputError, match=f"^{name}"):
        call(llm)
