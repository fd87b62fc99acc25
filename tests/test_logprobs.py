"""Log probs of the emitted tokens (decoding/logprobs.py): each is log_softmax of the raw logits of the
pass that produced the token, in every mode, batched, truncated, and through the Python API."""

from __future__ import annotations

import pytest
import torch

from trimode.decoding import Engine, EngineConfig, GenerationSettings, Mode, PassKind, SamplingParams, generate
from trimode.decoding.batch import Batch
from trimode.errors import InputError

from tolerance import bound, forward_bound

MODES = list(Mode)
TEXTS = [
    "def generate(prompt, max_new_tokens=32):",
    "The quick brown fox",
    "A",
    "Self-speculation drafts a block by diffusion and verifies it autoregressively",
]


def prompts_of(ck, texts=TEXTS):
    return [ck.tokenizer.encode(t) for t in texts]


def run(ck, mode, prompts, **kw):
    kw.setdefault("max_new_tokens", 24)
    return generate(ck.model, prompts, GenerationSettings(mode=mode, **kw))


@pytest.fixture(params=["tiny", "trained"])
def ck(request):
    return request.getfixturevalue(request.param)


def logprob_bound(logits: torch.Tensor, spec, span: int) -> float:
    """A log prob is logit - logsumexp(logits): another summation order moves each term by at most the
    logits' bound (logsumexp is 1-Lipschitz in the max norm), and logsumexp sums over the vocabulary."""
    return 2 * forward_bound(logits, spec, span) + bound(logits, spec.vocab_size)


def causal_logprobs(model, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal forward over prompt + tokens -> (log_softmax at each token [n], the logits that predict them [n, V])."""
    ids = torch.tensor([prompt + tokens], device=model.device)
    with torch.no_grad():
        logits = model(ids, model.new_cache(1, ids.shape[1]), PassKind.PREFILL)[0].float()
    at = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    target = torch.tensor(tokens, device=at.device)[:, None]
    return torch.log_softmax(at, dim=-1).gather(-1, target)[:, 0].cpu(), at.cpu()


def test_ar_logprobs_equal_a_full_causal_forward(ck):
    prompts = prompts_of(ck)
    for prompt, seq in zip(prompts, run(ck, Mode.AR, prompts, logprobs=0)):
        assert len(seq.logprobs) == len(seq.tokens) > 0 and seq.top_logprobs == []
        expected, logits = causal_logprobs(ck.model, prompt, seq.tokens)
        atol = logprob_bound(logits, ck.spec, span=len(prompt) + len(seq.tokens))
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("block_length", [4, 8])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("name", ["tiny_adapter", "trained"])
def test_self_spec_greedy_logprobs_equal_ar(request, name, block_length, batched):
    """Self-spec's log probs come from the verify pass: at T = 0 its tokens are AR's exactly and its
    log probs AR's up to summation order (a verify pass sums over other spans than a decode pass)."""
    ck = request.getfixturevalue(name)
    prompts = prompts_of(ck)
    ar = run(ck, Mode.AR, prompts, logprobs=0)
    if batched:
        spec = run(ck, Mode.SELF_SPEC, prompts, block_length=block_length, logprobs=0)
    else:
        spec = [run(ck, Mode.SELF_SPEC, [p], block_length=block_length, logprobs=0)[0] for p in prompts]
    assert [s.tokens for s in spec] == [a.tokens for a in ar]
    for prompt, a, s in zip(prompts, ar, spec):
        assert len(s.logprobs) == len(s.tokens)
        _, logits = causal_logprobs(ck.model, prompt, a.tokens)
        atol = logprob_bound(logits, ck.spec, span=len(prompt) + len(a.tokens) + block_length)
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(a.logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("block_length", [4, 8])
def test_diffusion_threshold_zero_logprobs_equal_its_one_denoise_pass(ck, block_length):
    """Threshold 0 commits the whole block from one pass: the seed's log prob is the prefill's, the
    block's that pass's (block pattern: logit i is position i), the next seed's the refresh's."""
    model, L = ck.model, block_length
    for prompt in prompts_of(ck)[:2]:
        (seq,) = run(
            ck,
            Mode.DIFFUSION,
            [prompt],
            block_length=L,
            threshold=0.0,
            max_new_tokens=L + 1,
            ignore_eos=True,
            logprobs=0,
        )
        assert seq.stats.passes["denoise"] == 1 and seq.stats.passes["refresh"] == 1
        tokens, got = seq.tokens, torch.tensor(seq.logprobs)
        causal, causal_logits = causal_logprobs(model, prompt, tokens)  # the prefill's and the refresh's
        block = torch.tensor([[tokens[0]] + [ck.spec.mask_token_id] * (L - 1)], device=model.device)
        with torch.no_grad():
            cache = model.new_cache(1, len(prompt) + L)
            model(torch.tensor([prompt], device=model.device), cache, PassKind.PREFILL)
            cache.advance(torch.arange(1, device=model.device), len(prompt))
            logits = model(block, cache, PassKind.DENOISE)[0].float().cpu()
        denoised = torch.log_softmax(logits[1:], dim=-1).gather(-1, torch.tensor(tokens[1:L])[:, None])[:, 0]
        expected = torch.cat([causal[:1], denoised, causal[L:]])
        span = len(prompt) + L
        atol = max(logprob_bound(logits, ck.spec, span), logprob_bound(causal_logits, ck.spec, span))
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


class Recorder:
    """Wraps a runner's backend and keeps every pass: (kind, tokens, slots, logits)."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __call__(self, kind, tokens, pool, slots, lengths, logit_index):
        logits = self.backend(kind, tokens, pool, slots, lengths, logit_index)
        self.calls.append((kind, tokens.clone(), list(slots), logits.clone()))
        return logits


def test_diffusion_logprobs_come_from_the_committing_pass(tiny):
    """With a threshold that commits a few tokens per pass, each block token's log prob is from the
    last denoise pass that saw its position masked (batched: each row keeps its own passes)."""
    prompts, L, mask_id = prompts_of(tiny), 8, tiny.spec.mask_token_id
    settings = GenerationSettings(
        mode=Mode.DIFFUSION, block_length=L, threshold=0.05, max_new_tokens=29, ignore_eos=True, logprobs=0
    )
    engine = Engine(tiny.model, EngineConfig(len(prompts), 64))
    recorder = engine.runner.backend = Recorder(engine.runner.backend)
    seqs = generate(tiny.model, prompts, settings, engine)
    for slot, seq in enumerate(seqs):  # a fresh engine hands out slots in arrival order
        num_blocks = -(-(len(seq.tokens) - 1) // L)
        assert num_blocks < seq.stats.passes["denoise"] < num_blocks * (L - 1)  # several commits per pass
        expected: list = [None] * len(seq.tokens)
        block = -1
        for kind, tokens, slots, logits in recorder.calls:
            if slot not in slots:
                continue
            row, log_probs = slots.index(slot), torch.log_softmax(logits[slots.index(slot)], dim=-1)
            if kind is PassKind.PREFILL:
                expected[0] = log_probs[-1, seq.tokens[0]]
            elif kind is PassKind.DENOISE:
                block += bool((tokens[row, 1:] == mask_id).all())  # a block's first pass
                for i in (tokens[row] == mask_id).nonzero()[:, 0].tolist():  # a later pass overwrites
                    if block * L + i < len(seq.tokens):
                        expected[block * L + i] = log_probs[i, seq.tokens[block * L + i]]
            elif kind is PassKind.REFRESH:
                expected[(block + 1) * L] = log_probs[0, seq.tokens[(block + 1) * L]]
        logits = torch.cat([c[3].flatten(0, 1) for c in recorder.calls])
        # the same logits: only logsumexp's summation order differs from log_softmax's
        torch.testing.assert_close(
            torch.tensor(seq.logprobs), torch.stack(expected), atol=bound(logits, tiny.spec.vocab_size), rtol=0
        )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_top_logprobs_are_sorted_and_hold_the_emitted_token(tiny, mode, temperature):
    k = 3
    seqs = run(tiny, mode, prompts_of(tiny), block_length=4, temperature=temperature, seed=5, logprobs=k)
    for seq in seqs:
        assert len(seq.logprobs) == len(seq.top_logprobs) == len(seq.tokens) > 0
        for token, lp, top in zip(seq.tokens, seq.logprobs, seq.top_logprobs):
            ids, values = [t for t, _ in top], [v for _, v in top]
            assert len(top) == k and len(set(ids)) == k and tiny.spec.mask_token_id not in ids
            assert all(isinstance(t, int) for t in ids)
            assert values == sorted(values, reverse=True) and values[0] <= 0 and lp <= 0
            assert all(torch.isfinite(torch.tensor(values + [lp])))
            if token in ids:
                assert lp == values[ids.index(token)]
            else:
                assert lp <= values[-1]
            if temperature == 0:
                assert ids[0] == token
    if temperature > 0:  # sampling emits tokens outside the top k too: the values do not assume greedy
        assert any(t not in [i for i, _ in top] for s in seqs for t, top in zip(s.tokens, s.top_logprobs))


@pytest.mark.parametrize("mode", MODES)
def test_each_sequence_gets_what_it_asked_for_in_one_batch(tiny, mode):
    """One batch of the same prompt asking None, 0, 2 and 5: the same tokens, each its own lists."""
    prompt = prompts_of(tiny)[0]
    settings = GenerationSettings(mode=mode, block_length=4, max_new_tokens=16, ignore_eos=True)
    engine = Engine(tiny.model, EngineConfig(4, 64))
    recorder = engine.runner.backend = Recorder(engine.runner.backend)
    asked = [None, 0, 2, 5]
    seqs = [engine.add(prompt, SamplingParams(16, ignore_eos=True, logprobs=k), settings.decoding) for k in asked]
    while engine.has_work:
        engine.step()
    assert all(s.tokens == seqs[0].tokens for s in seqs)
    assert seqs[0].logprobs == seqs[0].top_logprobs == seqs[1].top_logprobs == []
    assert all(len(s.logprobs) == 16 for s in seqs[1:])
    assert all(len(top) == k for s, k in zip(seqs[2:], asked[2:]) for top in s.top_logprobs)
    # rows of one batch: the same values up to the order their GEMMs sum in
    atol = logprob_bound(torch.cat([c[3].flatten(0, 1) for c in recorder.calls]), tiny.spec, span=64)
    for s in seqs[2:]:
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(seqs[1].logprobs), atol=atol, rtol=0)
    assert [[t for t, _ in top[:2]] for top in seqs[3].top_logprobs] == [
        [t for t, _ in top] for top in seqs[2].top_logprobs
    ]
    values = [torch.tensor([[v for _, v in top[:2]] for top in s.top_logprobs]) for s in seqs[2:]]
    torch.testing.assert_close(values[1], values[0], atol=atol, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_no_logprobs_computes_nothing_and_keeps_one_fetch_per_step(tiny, mode, monkeypatch):
    prompts = prompts_of(tiny)
    fetches = []
    fetch = Batch.fetch
    monkeypatch.setattr(Batch, "fetch", lambda self, *v: fetches.append(1) or fetch(self, *v))
    with_logprobs = run(tiny, mode, prompts, block_length=4, logprobs=2)
    num_fetches = len(fetches)
    fetches.clear()

    def refuse(*args):
        raise AssertionError("log probs computed though no sequence asked for them")

    monkeypatch.setattr("trimode.decoding.batch.token_logprobs", refuse)
    without = run(tiny, mode, prompts, block_length=4)
    assert [s.tokens for s in without] == [s.tokens for s in with_logprobs]
    assert all(s.logprobs == s.top_logprobs == [] for s in without)
    assert len(fetches) == num_fetches  # the log probs travel in the tokens' transfers


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("end", ["length", "eos"])
def test_truncated_output_keeps_one_logprob_per_token(tiny, mode, end):
    """max_new_tokens or a stop token cutting a self-spec cycle or a diffusion block: the lists are cut too."""
    prompts = prompts_of(tiny)
    if end == "length":
        seqs = run(tiny, mode, prompts, block_length=8, max_new_tokens=5, ignore_eos=True, logprobs=1)
        assert all(len(s.tokens) == 5 for s in seqs)
    else:
        reference = run(tiny, mode, prompts, block_length=8, ignore_eos=True)[0].tokens
        stop = next(t for t in reference[3:] if t not in reference[:3])
        seqs = run(tiny, mode, prompts, block_length=8, stop_token_ids=(stop,), logprobs=1)
        assert seqs[0].finish_reason == "eos" and seqs[0].tokens == reference[: reference.index(stop) + 1]
    assert all(len(s.logprobs) == len(s.top_logprobs) == len(s.tokens) for s in seqs)


@pytest.mark.parametrize("value", [-1, 21, True, 1.5, "2"])
def test_bad_logprobs_name_the_field(value):
    from trimode import SamplingParams as APIParams

    for make in (
        lambda: SamplingParams(logprobs=value),
        lambda: GenerationSettings(logprobs=value),
        lambda: APIParams(logprobs=value),
    ):
        with pytest.raises(InputError, match="logprobs"):
            make()


def test_the_python_api_returns_the_engines_logprobs():
    from trimode import LLM
    from trimode import SamplingParams as APIParams

    llm = LLM(device="cpu")
    texts = TEXTS[:2]
    params = APIParams(mode="self-spec", max_tokens=12, block_length=4, logprobs=2)
    outs = llm.generate(texts, params)
    seqs = generate(llm.checkpoint.model, [llm.tokenizer.encode(t) for t in texts], params.to_settings())
    assert [o.token_ids for o in outs] == [s.tokens for s in seqs]
    assert [o.logprobs for o in outs] == [s.logprobs for s in seqs]
    assert [o.top_logprobs for o in outs] == [s.top_logprobs for s in seqs]
    assert all(len(o.logprobs) == len(o.top_logprobs) == len(o.token_ids) for o in outs)
    plain = llm.generate(texts, APIParams(mode="self-spec", max_tokens=12, block_length=4))
    assert [o.token_ids for o in plain] == [o.token_ids for o in outs]
    assert all(o.logprobs == o.top_logprobs == [] for o in plain)


@pytest.mark.parametrize("mode", MODES)
def test_a_compiled_engine_gives_the_eager_logprobs(tiny_engine_dir, mode):
    """A built engine's passes return their logits next to their picks: the same code gives its log
    probs, which equal the eager engine's up to the compiled programs' summation order."""
    from trimode.builder.engine_dir import load_engine

    built = load_engine(tiny_engine_dir)
    model, L = built.checkpoint.model, built.block_lengths[0]
    prompts = prompts_of(built.checkpoint, TEXTS[:3])
    settings = GenerationSettings(mode=mode, max_new_tokens=12, block_length=L, ignore_eos=True, logprobs=2)
    compiled = generate(model, prompts, settings, built.new_engine())
    eager_engine = Engine(model, built.config)
    recorder = eager_engine.runner.backend = Recorder(eager_engine.runner.backend)
    eager = generate(model, prompts, settings, eager_engine)
    assert [s.tokens for s in compiled] == [s.tokens for s in eager]
    logits = torch.cat([c[3].flatten(0, 1) for c in recorder.calls])
    atol = logprob_bound(logits, model.spec, span=built.config.max_seq_len)
    for c, e in zip(compiled, eager):
        assert len(c.logprobs) == len(c.top_logprobs) == len(c.tokens)
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), atol=atol, rtol=0)
