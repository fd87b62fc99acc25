"""The auto mode (decoding/auto.py): whichever lossless mode it runs, AR's tokens at temperature 0,
and the mode it chooses is the one its measurements say is fastest."""

from __future__ import annotations

import pytest
from test_decoding import prompts_of, run, tokens_of

from trimode.decoding import (
    DecodeConfig,
    Engine,
    EngineConfig,
    GenerationSettings,
    Mode,
    SamplingParams,
    engine_for,
    generate,
)
from trimode.decoding.auto import (
    ALPHA,
    AR,
    EXPLORE_AGREEMENT,
    EXPLORE_RATIO,
    EXPLORE_SHARE,
    POOLED_ALPHA,
    RECHOOSE_CYCLES,
    RECHOOSE_SPECULATIVE,
    RUN_CYCLES,
    SWITCH_GAIN,
    TRUSTED_SAMPLES,
    WARMUP_RUNS,
    AutoPolicy,
    agreement,
    block_acceptance,
    choice_name,
    choices,
    parse_choice,
)
from trimode.decoding.batch import Batch
from trimode.errors import InputError


@pytest.mark.parametrize("ck_name", ["tiny_adapter", "trained"])
@pytest.mark.parametrize("block_length", [4, 8])
@pytest.mark.parametrize("batched", [False, True])
def test_auto_greedy_equals_ar_whatever_it_runs(request, ck_name, block_length, batched):
    ck = request.getfixturevalue(ck_name)
    prompts = prompts_of(ck)
    ar = run(ck, Mode.AR, prompts, ignore_eos=True)
    settings = GenerationSettings(mode=Mode.AUTO, block_length=block_length, max_new_tokens=40, ignore_eos=True)
    if batched:
        engine = engine_for(ck.model, prompts, settings)
        auto = generate(ck.model, prompts, settings, engine)
        ran = {name for seq in auto for name in seq.stats.auto_cycles}
        assert ran == {choice_name(c) for c in choices((block_length,))}  # each measured: switching mid-request
    else:
        auto = [generate(ck.model, [p], settings)[0] for p in prompts]
    assert tokens_of(auto) == tokens_of(ar)


@pytest.mark.parametrize("ck_name", ["tiny_adapter", "trained"])
def test_auto_that_chooses_the_block_length_too_gives_ar_s_tokens(request, ck_name):
    """A request that names no block length on an engine of two: auto runs every choice at both (each
    measured first), switching mid-request between modes and widths, and emits AR's tokens."""
    ck = request.getfixturevalue(ck_name)
    prompts = prompts_of(ck)
    ar = run(ck, Mode.AR, prompts, ignore_eos=True)
    engine = Engine(ck.model, EngineConfig(max_slots=len(prompts), max_seq_len=192), block_lengths=(4, 8))
    settings = GenerationSettings(mode=Mode.AUTO, max_new_tokens=40, ignore_eos=True)
    auto = generate(ck.model, prompts, settings, engine)
    assert {s.widths for s in auto} == {(4, 8)}
    assert {name for seq in auto for name in seq.stats.auto_cycles} == {choice_name(c) for c in choices((4, 8))}
    assert tokens_of(auto) == tokens_of(ar)


def test_the_widths_auto_may_run_are_the_engine_s_that_fit_unless_the_request_names_one(tiny):
    """Block lengths 4, 8 and 16: 16 is longer than a 12-token request may emit, and its quadratic cycle
    (16 x 17 positions) does not fit max_seq_len; a request that may emit 6 runs 4 only."""
    engine = Engine(tiny.model, EngineConfig(max_slots=2, max_seq_len=128), block_lengths=(8, 4, 16))
    prompt = prompts_of(tiny)[0]

    def add(mode, block_length=None, max_new_tokens=24):
        return engine.add(prompt, SamplingParams(max_new_tokens), DecodeConfig(mode, block_length))

    assert add(Mode.AUTO).widths == (4, 8) and add(Mode.AUTO, max_new_tokens=6).widths == (4,)
    assert add(Mode.AUTO, 4).widths == (4,) and add(Mode.SELF_SPEC).widths == ()
    with pytest.raises(InputError, match="one cycle"):  # named, it is refused as before
        add(Mode.AUTO, 16)
    with pytest.raises(InputError, match="block length 2"):
        add(Mode.AUTO, 2)


def test_a_width_switch_drops_the_drafts_of_the_other_width(trained, monkeypatch):
    """Quadratic drafts are one block's: quadratic at 4 after quadratic at 8 drafts afresh (its
    first cycle accepts 1 by construction, and is not counted); the tokens stay AR's."""
    schedule = iter([(Mode.QUADRATIC, 8)] * 3 + [(Mode.QUADRATIC, 4)] * 2 + [(Mode.SELF_SPEC, 8), AR] * 20)
    monkeypatch.setattr(AutoPolicy, "choose", lambda self, batch, now=None: next(schedule))
    prompt = prompts_of(trained)[3:]  # one the adapter drafts well: quadratic/4's second cycle accepts 4
    engine = Engine(trained.model, EngineConfig(max_slots=1, max_seq_len=192), block_lengths=(4, 8))
    settings = GenerationSettings(mode=Mode.AUTO, max_new_tokens=30, ignore_eos=True)
    (seq,) = generate(trained.model, prompt, settings, engine)
    assert seq.stats.accepted_lengths[3] == 1 and seq.stats.accepted_lengths[4] > 1  # quadratic/4's first, second
    assert seq.stats.auto_cycles["quadratic/8"] == 3 and seq.stats.auto_cycles["quadratic/4"] == 2
    assert tokens_of([seq]) == tokens_of(run(trained, Mode.AR, prompt, ignore_eos=True, max_new_tokens=30))


def _batch_free_to_choose(ck, block_lengths: tuple[int, ...]) -> Batch:
    """Two prefilled auto sequences that name no block length, on an engine of these block lengths."""
    engine = Engine(ck.model, EngineConfig(max_slots=2, max_seq_len=192), block_lengths=block_lengths)
    settings = GenerationSettings(mode=Mode.AUTO)
    seqs = [engine.add(p, settings.sampling, settings.decoding) for p in prompts_of(ck)[:2]]
    engine.step()  # prefill
    assert {s.widths for s in seqs} == {block_lengths}
    return Batch(engine.runner, seqs)


def test_it_chooses_the_block_length_of_the_highest_rate(tiny):
    """Self-spec at 4 (2 x 2.5 tokens / 2 ms) beats AR (2 / 1 ms), self-spec at 8 (2 x 3 / 3 ms) and
    quadratic at either; these sequences' own acceptance at 8 (6 a cycle) makes 8 the best for them."""
    batch = _batch_free_to_choose(tiny, (4, 8))
    policy = AutoPolicy({})
    measured = {AR: (1e-3, 1.0), (Mode.SELF_SPEC, 4): (2e-3, 2.5), (Mode.SELF_SPEC, 8): (3e-3, 3.0)}
    measured |= {(Mode.QUADRATIC, 4): (2e-3, 1.5), (Mode.QUADRATIC, 8): (6e-3, 2.0)}
    for (mode, width), (seconds, accepted) in measured.items():
        policy.seconds[mode, 2, width], policy.runs[mode, 2, width] = seconds, WARMUP_RUNS
        policy.last_run[mode, width], policy.acceptance[mode, width] = NOW, accepted
        policy.samples[mode, width] = TRUSTED_SAMPLES
    assert policy.choose(batch, NOW) == (Mode.SELF_SPEC, 4)
    for seq in batch.seqs:
        seq.acceptance = {(Mode.SELF_SPEC, 8): 6.0}
    policy.stints.clear()
    assert policy.choose(batch, NOW) == (Mode.SELF_SPEC, 8)


def test_of_the_choices_due_a_visit_the_most_promising_goes_first(tiny):
    """AR 2 / 1 ms; nothing else run for ages, nothing known of its acceptance (a block of 2 gives
    1.5 a cycle, of 8 about 2: EXPLORE_AGREEMENT a draft token). Self-spec/2 (2 x 1.5 / 2 ms) is within
    EXPLORE_RATIO of AR; self-spec/8 would beat AR accepting HOPED_SHARE of its block (2 x 4 / 3 ms):
    it goes first, though `choices` lists /2 first. Once /8 has its samples and they say 1.2 (a draft
    token taken 17% of the time), /2 is estimated at 1.17 a cycle, below EXPLORE_RATIO: AR stays."""
    batch = _batch_free_to_choose(tiny, (2, 8))
    policy = AutoPolicy({})
    measured = {AR: 1e-3, (Mode.SELF_SPEC, 2): 2e-3, (Mode.QUADRATIC, 2): 2.5e-3}
    measured |= {(Mode.SELF_SPEC, 8): 3e-3, (Mode.QUADRATIC, 8): 6e-3}
    for (mode, width), seconds in measured.items():
        policy.seconds[mode, 2, width], policy.runs[mode, 2, width] = seconds, WARMUP_RUNS
        policy.last_run[mode, width] = NOW if mode is Mode.AR else NOW - 1e6
    assert policy.pooled_acceptance((Mode.SELF_SPEC, 2)) == 1.5
    assert policy.pooled_acceptance((Mode.QUADRATIC, 8)) == pytest.approx(2, abs=0.01)
    assert policy.choose(batch, NOW) == (Mode.SELF_SPEC, 8)
    policy.stints.clear()
    policy.acceptance[Mode.SELF_SPEC, 8], policy.samples[Mode.SELF_SPEC, 8] = 1.2, TRUSTED_SAMPLES
    assert policy.choose(batch, NOW) == AR
    assert policy.pooled_acceptance((Mode.SELF_SPEC, 2)) == pytest.approx(1.17, abs=0.01)


def test_a_block_length_not_run_yet_is_estimated_from_its_mode_s_at_another():
    """Self-spec/4 accepting 3.6 a cycle is a draft token taken 93% of the time: 6.3 at 8, 1.93 at 2.
    Quadratic, not run at any length, is assumed EXPLORE_AGREEMENT a token."""
    policy = AutoPolicy({})
    policy.acceptance[Mode.SELF_SPEC, 4] = 3.6
    p = agreement(3.6, 4)
    assert block_acceptance(p, 4) == pytest.approx(3.6, abs=1e-4) and p == pytest.approx(0.93, abs=0.005)
    assert policy.pooled_acceptance((Mode.SELF_SPEC, 8)) == pytest.approx(block_acceptance(p, 8))
    assert 6.2 < block_acceptance(p, 8) < 6.4 and policy.pooled_acceptance((Mode.SELF_SPEC, 4)) == 3.6
    assert policy.pooled_acceptance((Mode.QUADRATIC, 8)) == block_acceptance(EXPLORE_AGREEMENT, 8)
    assert block_acceptance(agreement(8.0, 8), 16) > 15  # a whole block accepted: about the whole of one twice as long


def test_choice_names_are_the_bench_s_variant_names():
    assert [choice_name(c) for c in choices((4, 8))] == [
        "ar",
        "self-spec/4",
        "quadratic/4",
        "self-spec/8",
        "quadratic/8",
    ]
    assert all(parse_choice(choice_name(c)) == c for c in choices((2, 16)))
    for bad in ("ar/4", "diffusion/4", "self-spec", "self-spec/04", "self-spec/0", "quadratic/-2", "auto/8"):
        with pytest.raises(ValueError):
            parse_choice(bad)


NOW = 1000.0  # the clock the tests choose at (choose's `now`)


SS, Q = (Mode.SELF_SPEC, 4), (Mode.QUADRATIC, 4)  # the speculative choices at the tests' block length


def _policy_with(seconds: dict[Mode, float], acceptance: dict[Mode, float], b=2, width=4) -> AutoPolicy:
    """A policy whose measurements are given: every choice measured at batch size b (its acceptance
    from TRUSTED_SAMPLES cycles), none stale at NOW."""
    policy = AutoPolicy({})
    for mode, value in seconds.items():
        choice = AR if mode is Mode.AR else (mode, width)
        policy.seconds[mode, b, choice[1]] = value
        policy.last_run[choice], policy.runs[mode, b, choice[1]] = NOW, WARMUP_RUNS
        if mode in acceptance:
            policy.acceptance[choice], policy.samples[choice] = acceptance[mode], TRUSTED_SAMPLES
    return policy


@pytest.fixture
def batch_of_two(tiny):
    prompts = prompts_of(tiny)[:2]
    settings = GenerationSettings(mode=Mode.AUTO, block_length=4)
    engine = engine_for(tiny.model, prompts, settings)
    seqs = [engine.add(p, settings.sampling, settings.decoding) for p in prompts]
    engine.step()  # prefill
    return Batch(engine.runner, seqs)


@pytest.mark.parametrize(
    "seconds, acceptance, expected",
    [
        # AR: 2 tokens / 1 ms; self-spec: 2 x 3 / 2 ms; quadratic: 2 x 2.5 / 1.5 ms
        (
            {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 1.5e-3},
            {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 2.5},
            Q,
        ),
        (
            {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 4e-3},
            {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 2.5},
            SS,
        ),
        (
            {Mode.AR: 1e-3, Mode.SELF_SPEC: 5e-3, Mode.QUADRATIC: 4e-3},
            {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 2.5},
            AR,
        ),
    ],
)
def test_it_chooses_the_highest_rate(batch_of_two, seconds, acceptance, expected):
    assert _policy_with(seconds, acceptance).choose(batch_of_two, NOW) == expected


def test_a_sequences_own_acceptance_outweighs_the_mean(batch_of_two):
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 2e-3}, {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 1}
    )
    assert policy.choose(batch_of_two, NOW) == SS
    for seq in batch_of_two.seqs:  # these two draft badly with linear self-spec, well with quadratic
        seq.acceptance = {SS: 1.5, Q: 3.5}
    assert policy.choose(batch_of_two, NOW) == Q


def test_it_keeps_its_mode_unless_another_is_clearly_faster(batch_of_two):
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 1e-3}, {Mode.SELF_SPEC: 2.0, Mode.QUADRATIC: 1.0}
    )
    policy.last_run[AR] += 1e-6  # AR ran last
    policy.acceptance[Q] = 0.99 * SWITCH_GAIN  # AR 2000 tok/s, quadratic 1.98 x 1.04 / 1 ms
    assert policy.choose(batch_of_two, NOW) == AR
    policy.acceptance[Q] = 1.01 * SWITCH_GAIN
    assert policy.choose(batch_of_two, NOW) == Q


def test_it_measures_every_mode_first(batch_of_two):
    policy = AutoPolicy({})
    for seq in batch_of_two.seqs:  # as if each step had accepted 2
        seq.stats.accepted_lengths.append(2)
    ran = []
    for _ in range((WARMUP_RUNS + 1) * len(choices((4,)))):
        choice = policy.choose(batch_of_two)
        ran.append(choice)
        policy.record(batch_of_two, choice, 1e-3, [False, False])
    assert ran == [c for c in choices((4,)) for _ in range(WARMUP_RUNS + 1)]  # the first of each: not timed


def test_an_engine_s_build_times_stand_for_the_warm_up(batch_of_two):
    """Seeded with the step times its engine dir recorded at build (the manifest's `auto`), auto runs
    the mode of the best estimated rate at once: quadratic (2 x 2.0 prior tokens / 1.5 ms) over AR
    (2 / 1 ms), with no step spent measuring AR and self-spec first."""
    policy = AutoPolicy({})
    policy.seed({"ar": {"2": 1e-3}, "self-spec/4": {"2": 3e-3}, "quadratic/4": {"2": 1.5e-3}})
    assert policy.choose(batch_of_two) == Q
    assert AutoPolicy({}).choose(batch_of_two) == AR  # unseeded: measures AR first


def test_build_times_scale_as_ar_s_time_here_and_runs_of_a_mode_move_them(batch_of_two):
    """AR measured here at twice its build time (fewer threads, say): the other modes' build times
    count double too, so quadratic (its acceptance known: 2 a cycle) keeps the rate it had against
    AR at the build (2 x 2.0 / 5 ms against 2 / 2 ms: AR), where unscaled (2 x 2.0 / 2.5 ms) it
    would look faster. The first
    RUN_CYCLES - 1 cycles of a run are not its time (on CPU they ran up to 1.5x slower); the next
    move the estimate from the build time by ALPHA."""
    policy = AutoPolicy({})
    build = {"ar": {"2": 1e-3}, "self-spec/4": {"2": 3e-3}, "quadratic/4": {"2": 2.5e-3}}
    policy.seed(build)
    policy.acceptance[Q], policy.samples[Q] = 2.0, TRUSTED_SAMPLES
    policy.seconds[Mode.AR, 2, 0] = 2e-3
    assert policy.step_seconds(Q, 2) == pytest.approx(5e-3)
    assert policy.step_seconds(Q, 1) == pytest.approx(5e-3)  # no time at 1: the nearest size's
    assert policy.choose(batch_of_two) == AR
    for _ in range(RUN_CYCLES - 1):
        policy.record(batch_of_two, Q, 3e-3, [False, False])
    assert (Mode.QUADRATIC, 2, 4) not in policy.seconds
    policy.record(batch_of_two, Q, 3e-3, [False, False])
    assert policy.step_seconds(Q, 2) == pytest.approx((1 - ALPHA) * 5e-3 + ALPHA * 3e-3)


def test_a_switch_costs_what_its_first_cycles_take_beyond_the_mode_s_time(batch_of_two):
    """Self-spec's first RUN_CYCLES - 1 cycles after AR take 3 ms where its time is 2: the switch cost
    7 ms; AR's first cycles back at its time cost nothing. A switch to a faster mode is made only
    while what it saves on the tokens these sequences still owe (2 x 63 here) exceeds the round
    trip: at 3000 tokens/s against AR's 2000 it saves 21 ms."""
    policy = AutoPolicy({})
    build = {"ar": {"2": 1e-3}, "self-spec/4": {"2": 2e-3}, "quadratic/4": {"2": 9e-3}}
    policy.seed(build)
    policy.seconds.update({(Mode.AR, 2, 0): 1e-3, (Mode.SELF_SPEC, 2, 4): 2e-3})
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(3)
    policy.record(batch_of_two, AR, 1e-3, [False, False])
    for _ in range(RUN_CYCLES - 1):
        policy.record(batch_of_two, SS, 3e-3, [True, True])
    assert policy.switch_seconds[SS] == pytest.approx(7e-3)
    for _ in range(3):  # a stint shorter than RUN_CYCLES - 1 ends at the next switch
        policy.record(batch_of_two, AR, 1e-3, [False, False])
    policy.record(batch_of_two, SS, 2e-3, [True, True])
    assert policy.switch_seconds[AR] == 0
    policy.record(batch_of_two, AR, 1e-3, [False, False])

    owed = sum(seq.params.max_new_tokens - len(seq.tokens) for seq in batch_of_two.seqs)
    assert owed == 126
    policy.acceptance[SS] = 3.0
    for seq in batch_of_two.seqs:
        seq.acceptance = {}
    now = policy.last_run[AR]  # nothing stale
    policy.switch_seconds[SS] = 25e-3
    assert policy.choose(batch_of_two, now) == AR
    policy.switch_seconds[SS] = 15e-3
    policy.stints[(4,)].kept = ()  # another batch: choose afresh
    assert policy.choose(batch_of_two, now) == SS


def test_a_switch_runs_long_enough_to_pay_for_its_round_trip(batch_of_two):
    """Self-spec 2 ms a step, worse than AR here; a switch to it and back costs 7 ms: it runs 4 cycles
    before auto chooses again (2 where switching costs nothing, RUN_CYCLES at most; AR 1)."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 9e-3}, {Mode.SELF_SPEC: 1.0, Mode.QUADRATIC: 1.0}
    )
    assert policy.visit_cycles(SS, 2) == 2
    policy.switch_seconds[AR] = 1e-3
    policy.switch_seconds[SS] = 1.0
    assert policy.visit_cycles(SS, 2) == RUN_CYCLES and policy.visit_cycles(AR, 2) == 1
    policy.switch_seconds[SS] = 6e-3
    assert policy.visit_cycles(SS, 2) == 4
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(1)
    policy.record(batch_of_two, AR, 1e-3, [False, False])
    for cycle in range(4):
        policy.record(batch_of_two, SS, 8e-3 if cycle == 0 else 2e-3, [True, True])
        assert policy.choose(batch_of_two, NOW) == (SS if cycle < 3 else AR)


def test_a_visit_to_a_choice_short_of_trusted_samples_runs_until_it_has_them(batch_of_two):
    """Two-cycle visits to an untried quadratic/8 gave one sample each (its first cycle after a
    switch has no drafts): it took 7 round trips to learn. Now a visit runs until TRUSTED_SAMPLES.
    Quadratic, never run, would beat AR (2 / 1 ms) taking HOPED_SHARE of its blocks (2 x 3 / 2 ms)."""
    policy = _policy_with({Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 2e-3}, {Mode.SELF_SPEC: 0.5})
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(2)
    policy.record(batch_of_two, AR, 1e-3, [])
    policy.stints[batch_of_two.seqs[0].widths].cycles = 16  # AR ran a while: chosen again now
    choice, ran = policy.choose(batch_of_two, NOW), 0
    assert choice == Q  # never run: it might win
    while choice == Q:
        policy.record(batch_of_two, Q, 2e-3, [ran > 0, ran > 0])  # no drafts in its first cycle
        choice, ran = policy.choose(batch_of_two, NOW), ran + 1
    assert ran == 1 + TRUSTED_SAMPLES // 2 and policy.samples[Q] == TRUSTED_SAMPLES


def test_a_visit_goes_back_unless_clearly_faster_than_the_mode_it_left(batch_of_two):
    """Running self-spec (2 x 3 tokens / 2 ms: 3000 tokens/s; AR 2000) with AR stale and within
    EXPLORE_RATIO: a one-cycle AR visit, then back to self-spec, though a switch to self-spec costs
    far more than these sequences could save (it ran a moment ago: going back costs about nothing).
    AR is re-measured by its rate alone: below EXPLORE_RATIO of the best it is never visited."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 9e-3}, {Mode.SELF_SPEC: 3.0, Mode.QUADRATIC: 1.0}
    )
    policy.switch_seconds[SS] = 1.0
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(3)
    for _ in range(RUN_CYCLES):  # a run of self-spec
        policy.record(batch_of_two, SS, 2e-3, [True, True])
    later = NOW + 1e6  # everything stale
    policy.acceptance[SS] = 3.0 * EXPLORE_RATIO * 1.1  # AR within EXPLORE_RATIO: worth a visit
    for seq in batch_of_two.seqs:
        seq.acceptance = {}
    assert policy.choose(batch_of_two, later) == AR
    policy.record(batch_of_two, AR, 1e-3, [False, False])
    policy.last_run[Q] = later
    assert policy.choose(batch_of_two, later) == SS  # 2310 tokens/s against AR's 2000
    policy.record(batch_of_two, SS, 2e-3, [True, True])
    policy.acceptance[SS] = 3.0 * EXPLORE_RATIO * 0.9
    for seq in batch_of_two.seqs:
        seq.acceptance = {}
    assert policy.choose(batch_of_two, later) == SS  # AR below EXPLORE_RATIO: never visited


def test_time_outside_the_steps_counts_against_the_mode_of_short_steps(batch_of_two):
    """AR 2 tokens / 1 ms against self-spec 2 x 4.9 / 5 ms: AR; with 0.5 ms between steps (the median
    gap: one long one is an idle server), 2 / 1.5 ms against 9.8 / 5.5 ms: self-spec."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 5e-3, Mode.QUADRATIC: 50e-3}, {Mode.SELF_SPEC: 4.9, Mode.QUADRATIC: 1.0}
    )
    assert policy.choose(batch_of_two, NOW) == AR
    policy.gaps.extend([0.5e-3, 0.4e-3, 9.0, 0.6e-3, 0.5e-3])
    policy.stints.clear()
    assert policy.choose(batch_of_two, NOW) == SS


def test_while_ar_runs_the_same_sequences_the_choice_stands_for_rechoose_cycles(batch_of_two):
    """Acceptance does not change while AR runs: the choice is made again after RECHOOSE_CYCLES of
    them, or at once for another batch."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 9e-3}, {Mode.SELF_SPEC: 1.5, Mode.QUADRATIC: 1}
    )
    policy.record(batch_of_two, AR, 1e-3, [False, False])
    assert policy.choose(batch_of_two, NOW) == AR
    policy.acceptance[SS] = 4.0  # self-spec 4000 tokens/s now, AR 2000
    for _ in range(RECHOOSE_CYCLES - 1):
        policy.record(batch_of_two, AR, 1e-3, [False, False])
        assert policy.choose(batch_of_two, NOW) == AR
    assert policy.choose(batch_of_two.subset([0]), NOW) == SS
    policy.record(batch_of_two, AR, 1e-3, [False, False])
    assert policy.choose(batch_of_two, NOW) == SS


def test_a_speculative_choice_stands_for_rechoose_speculative_cycles(batch_of_two):
    """Choosing among seven choices at every self-spec cycle cost 2.5% of it on CPU: once chosen for
    the same sequences, a speculative choice is made again after RECHOOSE_SPECULATIVE cycles."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 9e-3}, {Mode.SELF_SPEC: 4.0, Mode.QUADRATIC: 1}
    )
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(4)
    for _ in range(RUN_CYCLES):
        policy.record(batch_of_two, SS, 2e-3, [True, True])
    assert policy.choose(batch_of_two, NOW) == SS  # 4000 tokens/s against AR's 2000
    for seq in batch_of_two.seqs:
        seq.acceptance = {SS: 0.5}  # now 500
        seq.stats.accepted_lengths.append(0.5)
    for _ in range(RECHOOSE_SPECULATIVE - 1):
        policy.record(batch_of_two, SS, 2e-3, [True, True])
        assert policy.choose(batch_of_two, NOW) == SS
    policy.record(batch_of_two, SS, 2e-3, [True, True])
    assert policy.choose(batch_of_two, NOW) == AR


def test_build_times_where_ar_has_not_run_scale_by_ar_s_time_at_the_nearest_batch_size():
    """AR measured at batch 8 only, at twice its build time: every build time counts double, at 4
    and (from 4) at 6 too. Unscaled, self-spec at 6 once looked 3x faster than it ran."""
    policy = AutoPolicy({})
    build = {"ar": {"4": 1e-3, "8": 1e-3}, "self-spec/4": {"4": 3e-3, "8": 4e-3}, "quadratic/4": {"4": 5e-3, "8": 6e-3}}
    policy.seed(build)
    policy.seconds[Mode.AR, 8, 0] = 2e-3
    assert policy.step_seconds(SS, 4) == pytest.approx(6e-3)
    assert policy.step_seconds(SS, 6) == pytest.approx(6e-3)
    assert policy.step_seconds(AR, 6) == pytest.approx(2e-3)


def test_a_mode_with_a_build_time_but_no_acceptance_is_measured_at_once_if_it_could_win(batch_of_two):
    """Seeded: AR 2 tokens / 1 ms; quadratic 1.5 ms a step, whose rate at these sequences' 0.5 tokens
    a cycle is below EXPLORE_RATIO of AR's, but which would beat AR accepting HOPED_SHARE of each
    block (2 x 2 / 1.5 ms): it runs at once, not once it is stale (a fresh engine ran AR for 1.4 s
    on requests where self-spec/8 ran 1.18x AR), and on while short of TRUSTED_SAMPLES (its first
    cycle has no drafts to accept), whatever the batch size; with them all the ratio rule alone
    decides, and 1 token a cycle never runs again. Self-spec (2 x 2 / 9 ms) never runs."""
    policy = AutoPolicy({})
    policy.seed({"ar": {"2": 1e-3}, "self-spec/4": {"2": 9e-3}, "quadratic/4": {"2": 1.5e-3}})
    for seq in batch_of_two.seqs:
        seq.acceptance = {Q: 0.5}
    now = policy.last_run[Q]  # nothing is stale
    assert policy.choose(batch_of_two, now) == Q
    policy.record(batch_of_two, Q, 1.5e-3, [False, False])  # no drafts: no acceptance
    policy.last_run[Q] = now  # on the test's clock
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(1)
    assert policy.choose(batch_of_two.subset([0]), now) == Q  # learning: whatever the batch size
    assert policy.choose(batch_of_two, now) == Q
    policy.record(batch_of_two, Q, 1.5e-3, [True, True])
    assert policy.acceptance[Q] == 1
    policy.samples[Q] = TRUSTED_SAMPLES
    assert policy.choose(batch_of_two, now + 1e6) == AR


def test_a_mode_is_measured_again_when_that_costs_at_most_its_share_of_the_time(batch_of_two):
    """AR is the best (2 tokens / 1 ms) and runs; self-spec (1.5 / 1 ms) is run again once its part
    of EXPLORE_SHARE (half: quadratic's rate is within EXPLORE_RATIO too) of the time since it last
    ran pays for that visit (two cycles), quadratic (30 / 20 ms) 20x later; a mode estimated below
    EXPLORE_RATIO of the best's rate never is, and leaves the whole share to the other."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 1e-3, Mode.QUADRATIC: 20e-3}, {Mode.SELF_SPEC: 0.75, Mode.QUADRATIC: 15}
    )
    now, since = NOW + 10, {}  # seconds since each mode last ran

    def choose() -> tuple:
        for c in choices((4,)):
            policy.last_run[c] = now - since.get(c, 0.0)  # AR just ran
        return policy.choose(batch_of_two, now)

    share = EXPLORE_SHARE / 2
    since = {SS: 2 * 0.9e-3 / share, Q: 2 * 19e-3 / share}
    assert choose() == AR
    since[SS] = 2 * 1.1e-3 / share
    assert choose() == SS
    since = {Q: 2 * 21e-3 / share}
    assert choose() == Q
    policy.acceptance[Q] = 0.99 * EXPLORE_RATIO * 20  # now below EXPLORE_RATIO x AR's rate
    since = {Q: 1e6, SS: 2 * 0.9e-3 / EXPLORE_SHARE}
    assert choose() == AR
    since[SS] = 2 * 1.1e-3 / EXPLORE_SHARE
    assert choose() == SS  # alone within EXPLORE_RATIO: the whole share


def test_a_new_batch_size_is_estimated_not_measured_again(batch_of_two):
    """Measured at batch size 1 only (AR also at 2): at 2 a mode's time is its time at 1 scaled as
    AR's, and nothing is forced to run again."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 3e-3, Mode.QUADRATIC: 1.6e-3}, {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 2}, b=1
    )
    policy.seconds[Mode.AR, 2, 0] = 1.5e-3
    assert policy.step_seconds(Q, 2) == pytest.approx(2.4e-3)
    assert policy.step_seconds(SS, 8) == pytest.approx(4.5e-3)  # AR not at 8: its time at 2
    assert policy.choose(batch_of_two, NOW) == Q  # 4 tokens / 2.4 ms over AR's 2 / 1.5 ms


def test_a_quadratic_cycle_without_drafts_is_not_counted(tiny):
    """Right after another mode the drafts are gone: that cycle accepts 1 by construction."""
    prompts = prompts_of(tiny)[:1]
    engine = Engine(tiny.model, EngineConfig(max_slots=1, max_seq_len=128))
    settings = GenerationSettings(mode=Mode.AUTO, block_length=4, max_new_tokens=30, ignore_eos=True)
    seq = engine.add(prompts[0], settings.sampling, settings.decoding)
    policy = engine.policies[Mode.AUTO]
    policy.choose = lambda batch: Q  # one quadratic cycle after the prefill: no drafts yet
    engine.step()
    engine.step()
    assert seq.stats.accepted_lengths == [1] and Q not in seq.acceptance
    engine.step()
    assert Q in seq.acceptance
    policy.choose = lambda batch: AR
    engine.step()
    assert seq.drafts is None  # AR moved the cache on: the next quadratic cycle drafts afresh


def test_admission_reserves_for_the_mode_run_last_and_before_any_for_quadratic(batch_of_two):
    policy = AutoPolicy({})
    policy.seed({"ar": {"2": 1e-3}, "quadratic/4": {"2": 2e-3}})
    assert policy.last_choice((4,)) == Q  # build times ran nothing here
    policy.record(batch_of_two, AR, 1e-3, [False, False])
    assert policy.last_choice((4,)) == AR and policy.last_choice((4, 8)) == (Mode.QUADRATIC, 8)


def test_one_lucky_cycle_moves_a_sequences_acceptance_from_the_mean_not_to_itself(batch_of_two):
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 2e-3}, {Mode.SELF_SPEC: 3.0, Mode.QUADRATIC: 2.0}
    )
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(8)
    policy.record(batch_of_two, SS, 2e-3, [True, True])
    assert [seq.acceptance[SS] for seq in batch_of_two.seqs] == [pytest.approx(4.0)] * 2  # 0.8 x 3 + 0.2 x 8


def test_the_acceptance_over_every_sequence_is_their_tokens_over_their_cycles(batch_of_two):
    """Sampled a cycle at a time between AR steps, a sequence that accepts 8 a cycle is met as often
    as one that accepts 2, but a run of both gives 2 x 8 tokens in 1 + 4 cycles: 3.2 a cycle, the
    mean's harmonic (the plain mean, 5, sent requests to self-spec that ran 0.75x AR). It moves by
    POOLED_ALPHA a cycle once it has 1 / POOLED_ALPHA of them."""
    policy = AutoPolicy({})
    for n, seq in zip([2, 8], batch_of_two.seqs):
        seq.stats.accepted_lengths.append(n)
    policy.record(batch_of_two, SS, None, [True, True])
    assert policy.acceptance[SS] == pytest.approx(3.2)
    policy.samples[SS] = 10_000
    policy.record(batch_of_two.subset([0]), SS, None, [True])
    expected = 1 / ((1 - POOLED_ALPHA) / 3.2 + POOLED_ALPHA / 2)
    assert policy.acceptance[SS] == pytest.approx(expected)


@pytest.mark.parametrize("runs", [AR, Q])
def test_auto_grows_a_sequence_for_the_mode_it_runs(tiny, monkeypatch, runs):
    """The engine asks auto for its mode before growing blocks: a sequence that runs AR holds the
    blocks of its length + 1, not those of a quadratic cycle (W(W+1) positions); and its tokens
    are still AR's."""
    monkeypatch.setattr(AutoPolicy, "choose", lambda self, batch, now=None: runs)
    prompts = prompts_of(tiny)[:2]
    engine = Engine(tiny.model, EngineConfig(max_slots=2, max_seq_len=96, kv_block_size=4))
    settings = GenerationSettings(mode=Mode.AUTO, block_length=4, max_new_tokens=12, ignore_eos=True)
    generate(tiny.model, prompts[:1], settings, engine)  # auto has run `runs`: admission reserves for it
    seqs = [engine.add(p, settings.sampling, settings.decoding) for p in prompts]
    cycle = 1 if runs == AR else 20  # a quadratic chunk: 4 x 5
    engine.step()  # prefill
    while engine.has_work:
        lengths = {seq.id: engine.runner.host_lengths[seq.held_slot] for seq in seqs if not seq.is_finished}
        engine.step()
        for seq in (s for s in seqs if not s.is_finished):
            assert len(seq.kv.blocks) == -(-(lengths[seq.id] + cycle) // 4)
    assert tokens_of(seqs) == tokens_of(run(tiny, Mode.AR, prompts, ignore_eos=True, max_new_tokens=12))
