"""Async scheduling (issue 25): AR a step ahead of the host (decoding/ar.py, AsyncARPolicy).

On CPU a pass is synchronous, so nothing overlaps here: these tests run the same code paths
(EngineConfig(async_steps=True)) and check what must hold wherever it runs: the tokens, log probs
and finish reasons of the synchronous engine, a step's pass launched before the host waits for the
last step's tokens, and preemption, aborts and EOS with a token in flight.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from trimode.decoding import DecodeConfig, Engine, EngineConfig, Mode, SamplingParams
from trimode.decoding.ar import AsyncARPolicy, inputs
from trimode.decoding.auto import AutoPolicy
from trimode.decoding.batch import Batch, Fetch
from trimode.decoding.engine import use_async_steps
from trimode.decoding.runner import ModelRunner
from trimode.errors import ConfigError

from test_engine import REQUESTS, TEXTS

AR_REQUESTS = [(Mode.AR, None, 0.0, 0), (Mode.AR, None, 0.9, 5), (Mode.AR, None, 0.0, 0), (Mode.AR, None, 1.0, 7)]


def run(ck, config: EngineConfig, requests, arrivals=None, max_new_tokens=24, logprobs=None, stop=()):
    """The requests (mode, block length, temperature, seed) over TEXTS, request i added at step
    arrivals[i] (default: all at once), stepped to the end. -> the sequences and each step's output."""
    engine = Engine(ck.model, config)
    prompts = [ck.tokenizer.encode(t) for t in TEXTS]
    arrivals = arrivals or [0] * len(requests)
    seqs, steps, step = {}, [], 0
    while len(seqs) < len(requests) or engine.has_work:
        for i, (mode, block_length, temperature, seed) in enumerate(requests):
            if arrivals[i] == step:
                params = SamplingParams(
                    max_new_tokens, temperature, seed, ignore_eos=not stop, stop_token_ids=stop, logprobs=logprobs
                )
                seqs[i] = engine.add(prompts[i], params, DecodeConfig(mode, block_length))
        steps.append(engine.step())
        step += 1
    assert engine.blocks.num_used == 0 and engine.runner.num_free == config.max_slots
    return [seqs[i] for i in range(len(requests))], steps


def streamed(seqs, steps) -> list[list[int]]:
    """Each sequence's tokens as the steps' outputs gave them, in order."""
    return [[t for out in steps for t in out.get(s.id, [])] for s in seqs]


@pytest.mark.parametrize("requests", [AR_REQUESTS, REQUESTS], ids=["ar", "every-mode"])
@pytest.mark.parametrize("arrivals", [None, [0, 1, 2, 3, 5, 8, 9, 11]], ids=["together", "staggered"])
def test_async_ar_emits_the_synchronous_tokens_and_log_probs(trained, requests, arrivals):
    config = EngineConfig(max_slots=4, max_seq_len=128, prefill_chunk=5)
    want, _ = run(trained, config, requests, arrivals, logprobs=2)
    got, steps = run(trained, dataclasses.replace(config, async_steps=True), requests, arrivals, logprobs=2)
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [s.top_logprobs for s in got] == [s.top_logprobs for s in want]
    assert [s.logprobs for s in got] == [s.logprobs for s in want]
    assert [s.stats.passes for s in got] == [s.stats.passes for s in want]  # no pass past max_new_tokens
    assert streamed(got, steps) == [s.tokens for s in got]  # every token given out once, in order


def test_an_ar_step_launches_its_pass_before_it_waits_for_the_last_step_s_tokens(trained, monkeypatch):
    """The overlap: in a running batch each step runs its decode pass, then waits for the tokens the
    previous step's pass picked (one wait per step), and emits those."""
    events = []
    run_pass, cut = ModelRunner.run, Fetch._cut
    monkeypatch.setattr(
        ModelRunner, "run", lambda self, kind, *a: events.append(kind.value) or run_pass(self, kind, *a)
    )
    monkeypatch.setattr(Fetch, "_cut", lambda self: events.append("wait") or cut(self))  # a transfer waited for
    engine = Engine(trained.model, EngineConfig(max_slots=4, max_seq_len=128, async_steps=True))
    seqs = [engine.add(trained.tokenizer.encode(t), SamplingParams(6, ignore_eos=True)) for t in TEXTS[:3]]
    engine.step()  # prefill: the first tokens
    assert events == ["prefill", "wait"] and all(len(s.tokens) == 1 for s in seqs)
    events.clear()
    assert not any(engine.step().values()) and events == ["decode"]  # the second tokens are in flight
    flight = seqs[0].pending[0]
    for n in range(3, 7):
        events.clear()
        out = engine.step()
        assert events == ["decode", "wait"] and all(len(out[s.id]) == 1 and len(s.tokens) == n - 1 for s in seqs)
        assert seqs[0].pending[0] is not flight and inputs(Batch(engine.runner, seqs)) is seqs[0].pending[0].picks
        flight = seqs[0].pending[0]
    events.clear()
    out = engine.step()  # the sixth token was the last: no pass for a seventh
    assert events == ["wait"] and all(s.is_finished and len(s.tokens) == 6 for s in seqs)


def test_a_stop_token_ends_async_ar_with_one_pass_past_it(trained):
    config = EngineConfig(max_slots=4, max_seq_len=128)
    free, _ = run(trained, config, AR_REQUESTS[:1])
    stop = (free[0].tokens[5],)
    want, _ = run(trained, config, AR_REQUESTS[:1], stop=stop)
    got, steps = run(trained, EngineConfig(max_slots=4, max_seq_len=128, async_steps=True), AR_REQUESTS[:1], stop=stop)
    assert got[0].tokens == want[0].tokens == free[0].tokens[: free[0].tokens.index(stop[0]) + 1]
    assert got[0].finish_reason == want[0].finish_reason == "eos"
    assert got[0].stats.passes["decode"] == want[0].stats.passes["decode"] + 1  # the token after EOS, dropped
    assert streamed(got, steps) == [got[0].tokens]


@pytest.mark.parametrize("stop_at", [None, 2, 5, 9], ids=["no-stop", "stop-2", "stop-5", "stop-9"])
def test_auto_switching_out_of_async_ar_emits_ar_s_tokens(trained, monkeypatch, stop_at):
    """Auto on async AR steps, made to run AR, AR, self-spec, AR, quadratic, quadratic, AR, ...: a
    switch out of AR first emits the token in flight (one that is a stop token ends the sequence
    there). The tokens, finish reasons and stream are the synchronous AR engine's at T = 0."""
    ar, spec, quad = (Mode.AR, 0), (Mode.SELF_SPEC, 4), (Mode.QUADRATIC, 4)
    schedule = itertools.cycle([ar, ar, spec, ar, quad, quad, ar])
    monkeypatch.setattr(AutoPolicy, "choose", lambda self, batch, now=None: next(schedule))
    config = EngineConfig(max_slots=4, max_seq_len=128)
    auto = [(Mode.AUTO, 4, 0.0, 0)] * 3
    free, _ = run(trained, config, AR_REQUESTS[:1])
    stop = () if stop_at is None else (free[0].tokens[stop_at],)
    want, _ = run(trained, config, [AR_REQUESTS[0]] * 3, [0, 1, 3], stop=stop)
    got, steps = run(trained, dataclasses.replace(config, async_steps=True), auto, [0, 1, 3], stop=stop)
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [s.finish_reason for s in got] == [s.finish_reason for s in want]
    assert {m for s in got for m in s.stats.auto_cycles} == {"ar", "self-spec/4", "quadratic/4"}
    assert streamed(got, steps) == [s.tokens for s in got]


def test_auto_times_an_async_ar_step_only_when_it_waits_for_a_token_in_flight(trained, monkeypatch):
    """The first AR step after the prefill (or after another mode) only launches its pass: its time
    would flatter AR, so auto does not count it."""
    monkeypatch.setattr(AutoPolicy, "choose", lambda self, batch, now=None: (Mode.AR, 0))
    engine = Engine(trained.model, EngineConfig(max_slots=2, max_seq_len=128, async_steps=True))
    engine.add(trained.tokenizer.encode(TEXTS[0]), SamplingParams(8, ignore_eos=True), DecodeConfig(Mode.AUTO, 4))
    runs = []
    while engine.has_work:
        engine.step()
        runs.append(engine.auto.runs[Mode.AR, 1, 0])
    assert runs == [0, 0, 1, 2, 3, 4, 5, 6, 7]  # prefill (token 1), a launch, then one wait a step


def test_preempted_async_sequences_resume_with_their_tokens(trained):
    """A pool of one max_seq_len sequence and a bit: sequences with a token in flight are preempted
    (it is emitted first), resume, and finish with the dense pool's tokens; nothing is lost."""
    requests = [*AR_REQUESTS, (Mode.SELF_SPEC, 4, 0.0, 0), (Mode.AR, None, 0.0, 0)]
    want, _ = run(trained, EngineConfig(max_slots=6, max_seq_len=96, kv_block_size=96), requests, max_new_tokens=48)
    tight = EngineConfig(max_slots=6, max_seq_len=96, kv_block_size=4, num_kv_blocks=26, async_steps=True)
    got, steps = run(trained, tight, requests, max_new_tokens=48)
    assert sum(s.stats.num_preemptions for s in got) > 0
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert streamed(got, steps) == [s.tokens for s in got]


def test_an_aborted_request_with_a_token_in_flight_leaves_the_others_unchanged(trained):
    config = EngineConfig(max_slots=4, max_seq_len=128, async_steps=True)
    want, _ = run(trained, config, AR_REQUESTS[:3])
    engine = Engine(trained.model, config)
    params = SamplingParams(24, ignore_eos=True)
    seqs = [engine.add(trained.tokenizer.encode(t), params) for t in TEXTS[:3]]
    for _ in range(4):
        engine.step()
    assert seqs[1].pending is not None and engine.abort(seqs[1].id)
    assert seqs[1].pending is None and seqs[1].finish_reason == "abort" and engine.runner.num_free == 2
    while engine.has_work:
        engine.step()
    assert [seqs[0].tokens, seqs[2].tokens] == [want[0].tokens, want[2].tokens]


def test_ar_and_auto_s_ar_run_ahead_only_when_asked(trained, monkeypatch):
    engine = Engine(trained.model, EngineConfig(async_steps=True))
    assert isinstance(engine.policies[Mode.AR], AsyncARPolicy)
    assert engine.auto.policies[Mode.AR] is engine.policies[Mode.AR]
    monkeypatch.delenv("TRIMODE_ASYNC_STEPS", raising=False)
    assert not Engine(trained.model, EngineConfig()).async_steps  # CPU
    monkeypatch.setenv("TRIMODE_ASYNC_STEPS", "1")
    assert use_async_steps(EngineConfig(), trained.model.device)
    assert not use_async_steps(EngineConfig(async_steps=False), trained.model.device)
    monkeypatch.setenv("TRIMODE_ASYNC_STEPS", "yes")
    with pytest.raises(ConfigError, match="TRIMODE_ASYNC_STEPS='yes': expected 1 \\(on\\) or 0 \\(off\\)"):
        Engine(trained.model, EngineConfig())
