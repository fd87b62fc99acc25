"""The auto mode (decoding/auto.py): whichever lossless mode it runs, AR's tokens at temperature 0,
and the mode it chooses is the one its measurements say is fastest."""

from __future__ import annotations

import pytest
from test_decoding import prompts_of, run, tokens_of

from trimode.decoding import Engine, EngineConfig, GenerationSettings, Mode, engine_for, generate
from trimode.decoding.auto import (
    ALPHA,
    CHOICES,
    EXPLORE_RATIO,
    EXPLORE_SHARE,
    POOLED_ALPHA,
    RECHOOSE_CYCLES,
    RUN_CYCLES,
    SWITCH_GAIN,
    TRUSTED_SAMPLES,
    WARMUP_RUNS,
    AutoPolicy,
)
from trimode.decoding.batch import Batch


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
        ran = {mode for seq in auto for mode in seq.stats.auto_cycles}
        assert ran == {m.value for m in CHOICES}  # each measured at least once: switching mid-request
    else:
        auto = [generate(ck.model, [p], settings)[0] for p in prompts]
    assert tokens_of(auto) == tokens_of(ar)


NOW = 1000.0  # the clock the tests choose at (choose's `now`)


def _policy_with(seconds: dict[Mode, float], acceptance: dict[Mode, float], b=2, width=4) -> AutoPolicy:
    """A policy whose measurements are given: every mode measured at batch size b, none stale at NOW."""
    policy = AutoPolicy({})
    for mode in CHOICES:
        policy.seconds[mode, b, width] = seconds[mode]
        policy.last_run[mode, width], policy.runs[mode, b, width] = NOW, WARMUP_RUNS
        if mode is not Mode.AR:
            policy.acceptance[mode, width] = acceptance[mode]
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
            Mode.QUADRATIC,
        ),
        (
            {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 4e-3},
            {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 2.5},
            Mode.SELF_SPEC,
        ),
        (
            {Mode.AR: 1e-3, Mode.SELF_SPEC: 5e-3, Mode.QUADRATIC: 4e-3},
            {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 2.5},
            Mode.AR,
        ),
    ],
)
def test_it_chooses_the_highest_rate(batch_of_two, seconds, acceptance, expected):
    assert _policy_with(seconds, acceptance).choose(batch_of_two, NOW) is expected


def test_a_sequences_own_acceptance_outweighs_the_mean(batch_of_two):
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 2e-3}, {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 1}
    )
    assert policy.choose(batch_of_two, NOW) is Mode.SELF_SPEC
    for seq in batch_of_two.seqs:  # these two draft badly with linear self-spec, well with quadratic
        seq.acceptance = {Mode.SELF_SPEC: 1.5, Mode.QUADRATIC: 3.5}
    assert policy.choose(batch_of_two, NOW) is Mode.QUADRATIC


def test_it_keeps_its_mode_unless_another_is_clearly_faster(batch_of_two):
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 1e-3}, {Mode.SELF_SPEC: 2.0, Mode.QUADRATIC: 1.0}
    )
    policy.last_run[Mode.AR, 4] += 1e-6  # AR ran last
    policy.acceptance[Mode.QUADRATIC, 4] = 0.99 * SWITCH_GAIN  # AR 2000 tok/s, quadratic 1.98 x 1.04 / 1 ms
    assert policy.choose(batch_of_two, NOW) is Mode.AR
    policy.acceptance[Mode.QUADRATIC, 4] = 1.01 * SWITCH_GAIN
    assert policy.choose(batch_of_two, NOW) is Mode.QUADRATIC


def test_it_measures_every_mode_first(batch_of_two):
    policy = AutoPolicy({})
    for seq in batch_of_two.seqs:  # as if each step had accepted 2
        seq.stats.accepted_lengths.append(2)
    ran = []
    for _ in range((WARMUP_RUNS + 1) * len(CHOICES)):
        mode = policy.choose(batch_of_two)
        ran.append(mode)
        policy.record(batch_of_two, mode, 1e-3, [False, False])
    assert ran == [m for m in CHOICES for _ in range(WARMUP_RUNS + 1)]  # the first of each: not timed


def test_an_engine_s_build_times_stand_for_the_warm_up(batch_of_two):
    """Seeded with the step times its engine dir recorded at build (the manifest's `auto`), auto runs
    the mode of the best estimated rate at once: quadratic (2 x 2.0 prior tokens / 1.5 ms) over AR
    (2 / 1 ms), with no step spent measuring AR and self-spec first."""
    policy = AutoPolicy({})
    policy.seed(
        {"block_length": 4, "seconds": {"ar": {"2": 1e-3}, "self-spec": {"2": 3e-3}, "quadratic": {"2": 1.5e-3}}}
    )
    assert policy.choose(batch_of_two) is Mode.QUADRATIC
    assert AutoPolicy({}).choose(batch_of_two) is Mode.AR  # unseeded: measures AR first


def test_build_times_scale_as_ar_s_time_here_and_runs_of_a_mode_move_them(batch_of_two):
    """AR measured here at twice its build time (fewer threads, say): the other modes' build times
    count double too, so quadratic keeps the rate it had against AR at the build (2 x 2.0 / 5 ms
    against 2 / 2 ms: AR), where unscaled (2 x 2.0 / 2.5 ms) it would look faster. The first
    RUN_CYCLES - 1 cycles of a run are not its time (on CPU they ran up to 1.5x slower); the next
    move the estimate from the build time by ALPHA."""
    policy = AutoPolicy({})
    build = {"ar": {"2": 1e-3}, "self-spec": {"2": 3e-3}, "quadratic": {"2": 2.5e-3}}
    policy.seed({"block_length": 4, "seconds": build})
    policy.seconds[Mode.AR, 2, 4] = 2e-3
    assert policy.step_seconds(Mode.QUADRATIC, 2, 4) == pytest.approx(5e-3)
    assert policy.step_seconds(Mode.QUADRATIC, 1, 4) == pytest.approx(5e-3)  # no time at 1: the nearest size's
    assert policy.choose(batch_of_two) is Mode.AR
    for _ in range(RUN_CYCLES - 1):
        policy.record(batch_of_two, Mode.QUADRATIC, 3e-3, [False, False])
    assert (Mode.QUADRATIC, 2, 4) not in policy.seconds
    policy.record(batch_of_two, Mode.QUADRATIC, 3e-3, [False, False])
    assert policy.step_seconds(Mode.QUADRATIC, 2, 4) == pytest.approx((1 - ALPHA) * 5e-3 + ALPHA * 3e-3)


def test_a_switch_costs_what_its_first_cycles_take_beyond_the_mode_s_time(batch_of_two):
    """Self-spec's first RUN_CYCLES - 1 cycles after AR take 3 ms where its time is 2: the switch cost
    7 ms; AR's first cycles back at its time cost nothing. A switch to a faster mode is made only
    while what it saves on the tokens these sequences still owe (2 x 63 here) exceeds the round
    trip: at 3000 tokens/s against AR's 2000 it saves 21 ms."""
    policy = AutoPolicy({})
    build = {"ar": {"2": 1e-3}, "self-spec": {"2": 2e-3}, "quadratic": {"2": 9e-3}}
    policy.seed({"block_length": 4, "seconds": build})
    policy.seconds.update({(Mode.AR, 2, 4): 1e-3, (Mode.SELF_SPEC, 2, 4): 2e-3})
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(3)
    policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])
    for _ in range(RUN_CYCLES - 1):
        policy.record(batch_of_two, Mode.SELF_SPEC, 3e-3, [True, True])
    assert policy.switch_seconds[Mode.SELF_SPEC, 4] == pytest.approx(7e-3)
    for _ in range(3):  # a stint shorter than RUN_CYCLES - 1 ends at the next switch
        policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])
    policy.record(batch_of_two, Mode.SELF_SPEC, 2e-3, [True, True])
    assert policy.switch_seconds[Mode.AR, 4] == 0
    policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])

    owed = sum(seq.params.max_new_tokens - len(seq.tokens) for seq in batch_of_two.seqs)
    assert owed == 126
    policy.acceptance[Mode.SELF_SPEC, 4] = 3.0
    for seq in batch_of_two.seqs:
        seq.acceptance = {}
    now = policy.last_run[Mode.AR, 4]  # nothing stale
    policy.switch_seconds[Mode.SELF_SPEC, 4] = 25e-3
    assert policy.choose(batch_of_two, now) is Mode.AR
    policy.switch_seconds[Mode.SELF_SPEC, 4] = 15e-3
    policy.stints[4].kept = ()  # another batch: choose afresh
    assert policy.choose(batch_of_two, now) is Mode.SELF_SPEC


def test_a_switch_runs_long_enough_to_pay_for_its_round_trip(batch_of_two):
    """Self-spec 2 ms a step, worse than AR here; a switch to it and back costs 7 ms: it runs 4 cycles
    before auto chooses again (2 where switching costs nothing, RUN_CYCLES at most; AR 1)."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 9e-3}, {Mode.SELF_SPEC: 1.0, Mode.QUADRATIC: 1.0}
    )
    assert policy.visit_cycles(Mode.SELF_SPEC, 2, 4) == 2
    policy.switch_seconds[Mode.AR, 4] = 1e-3
    policy.switch_seconds[Mode.SELF_SPEC, 4] = 1.0
    assert policy.visit_cycles(Mode.SELF_SPEC, 2, 4) == RUN_CYCLES and policy.visit_cycles(Mode.AR, 2, 4) == 1
    policy.switch_seconds[Mode.SELF_SPEC, 4] = 6e-3
    assert policy.visit_cycles(Mode.SELF_SPEC, 2, 4) == 4
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(1)
    policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])
    for cycle in range(4):
        policy.record(batch_of_two, Mode.SELF_SPEC, 8e-3 if cycle == 0 else 2e-3, [True, True])
        assert policy.choose(batch_of_two, NOW) is (Mode.SELF_SPEC if cycle < 3 else Mode.AR)


def test_a_visit_goes_back_unless_clearly_faster_than_the_mode_it_left(batch_of_two):
    """Running self-spec (2 x 3 tokens / 2 ms: 3000 tokens/s; AR 2000) with AR stale and within
    EXPLORE_RATIO: a one-cycle AR visit, then back to self-spec, though a switch to self-spec costs
    far more than these sequences could save (it ran a moment ago: going back costs about nothing).
    AR is re-measured by its rate alone: below EXPLORE_RATIO of the best it is never visited."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 9e-3}, {Mode.SELF_SPEC: 3.0, Mode.QUADRATIC: 1.0}
    )
    policy.switch_seconds[Mode.SELF_SPEC, 4] = 1.0
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(3)
    for _ in range(RUN_CYCLES):  # a run of self-spec
        policy.record(batch_of_two, Mode.SELF_SPEC, 2e-3, [True, True])
    later = NOW + 1e6  # everything stale
    policy.acceptance[Mode.SELF_SPEC, 4] = 3.0 * EXPLORE_RATIO * 1.1  # AR within EXPLORE_RATIO: worth a visit
    for seq in batch_of_two.seqs:
        seq.acceptance = {}
    assert policy.choose(batch_of_two, later) is Mode.AR
    policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])
    policy.last_run[Mode.QUADRATIC, 4] = later
    assert policy.choose(batch_of_two, later) is Mode.SELF_SPEC  # 2310 tokens/s against AR's 2000
    policy.record(batch_of_two, Mode.SELF_SPEC, 2e-3, [True, True])
    policy.acceptance[Mode.SELF_SPEC, 4] = 3.0 * EXPLORE_RATIO * 0.9
    for seq in batch_of_two.seqs:
        seq.acceptance = {}
    assert policy.choose(batch_of_two, later) is Mode.SELF_SPEC  # AR below EXPLORE_RATIO: never visited


def test_time_outside_the_steps_counts_against_the_mode_of_short_steps(batch_of_two):
    """AR 2 tokens / 1 ms against self-spec 2 x 4.9 / 5 ms: AR; with 0.5 ms between steps (the median
    gap: one long one is an idle server), 2 / 1.5 ms against 9.8 / 5.5 ms: self-spec."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 5e-3, Mode.QUADRATIC: 50e-3}, {Mode.SELF_SPEC: 4.9, Mode.QUADRATIC: 1.0}
    )
    assert policy.choose(batch_of_two, NOW) is Mode.AR
    policy.gaps.extend([0.5e-3, 0.4e-3, 9.0, 0.6e-3, 0.5e-3])
    policy.stints.clear()
    assert policy.choose(batch_of_two, NOW) is Mode.SELF_SPEC


def test_while_ar_runs_the_same_sequences_the_choice_stands_for_rechoose_cycles(batch_of_two):
    """Acceptance does not change while AR runs: the choice is made again after RECHOOSE_CYCLES of
    them, or at once for another batch."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 9e-3}, {Mode.SELF_SPEC: 1.5, Mode.QUADRATIC: 1}
    )
    policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])
    assert policy.choose(batch_of_two, NOW) is Mode.AR
    policy.acceptance[Mode.SELF_SPEC, 4] = 4.0  # self-spec 4000 tokens/s now, AR 2000
    for _ in range(RECHOOSE_CYCLES - 1):
        policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])
        assert policy.choose(batch_of_two, NOW) is Mode.AR
    assert policy.choose(batch_of_two.subset([0]), NOW) is Mode.SELF_SPEC
    policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])
    assert policy.choose(batch_of_two, NOW) is Mode.SELF_SPEC


def test_build_times_where_ar_has_not_run_scale_by_ar_s_time_at_the_nearest_batch_size():
    """AR measured at batch 8 only, at twice its build time: every build time counts double, at 4
    and (from 4) at 6 too. Unscaled, self-spec at 6 once looked 3x faster than it ran."""
    policy = AutoPolicy({})
    build = {"ar": {"4": 1e-3, "8": 1e-3}, "self-spec": {"4": 3e-3, "8": 4e-3}, "quadratic": {"4": 5e-3, "8": 6e-3}}
    policy.seed({"block_length": 4, "seconds": build})
    policy.seconds[Mode.AR, 8, 4] = 2e-3
    assert policy.step_seconds(Mode.SELF_SPEC, 4, 4) == pytest.approx(6e-3)
    assert policy.step_seconds(Mode.SELF_SPEC, 6, 4) == pytest.approx(6e-3)
    assert policy.step_seconds(Mode.AR, 6, 4) == pytest.approx(2e-3)


def test_a_mode_with_a_build_time_but_no_acceptance_is_measured_once_if_it_could_win(batch_of_two):
    """Seeded: AR 2 tokens / 1 ms; quadratic 1.5 ms a step, whose rate at these sequences' 0.5 tokens
    a cycle is below EXPLORE_RATIO of AR's, but which would beat AR accepting HOPED_SHARE of each
    block (2 x 2 / 1.5 ms): once a visit costs EXPLORE_SHARE of the time since the seed, it runs two
    cycles (the first has no drafts to accept), which measure its acceptance; with fewer than
    TRUSTED_SAMPLES of them it would be re-measured that way, so here it has them all; then the ratio
    rule alone decides, and 1 token a cycle never runs again. Self-spec (2 x 2 / 9 ms) never runs."""
    policy = AutoPolicy({})
    policy.seed(
        {"block_length": 4, "seconds": {"ar": {"2": 1e-3}, "self-spec": {"2": 9e-3}, "quadratic": {"2": 1.5e-3}}}
    )
    for seq in batch_of_two.seqs:
        seq.acceptance = {Mode.QUADRATIC: 0.5}
    seeded = policy.last_run[Mode.QUADRATIC, 4]
    policy.last_run[Mode.AR, 4] = now = seeded + 0.9 * 2 * 1.5e-3 / EXPLORE_SHARE  # AR ran since
    assert policy.choose(batch_of_two, now) is Mode.AR
    policy.last_run[Mode.AR, 4] = now = seeded + 1.1 * 2 * 1.5e-3 / EXPLORE_SHARE  # a visit: two cycles
    assert policy.choose(batch_of_two, now) is Mode.QUADRATIC
    policy.record(batch_of_two, Mode.QUADRATIC, 1.5e-3, [False, False])  # no drafts: no acceptance
    policy.last_run[Mode.QUADRATIC, 4] = now  # on the test's clock
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(1)
    assert policy.choose(batch_of_two.subset([0]), now) is Mode.AR  # another batch size: no second cycle
    assert policy.choose(batch_of_two, now) is Mode.QUADRATIC  # a switch runs two cycles
    policy.record(batch_of_two, Mode.QUADRATIC, 1.5e-3, [True, True])
    assert policy.acceptance[Mode.QUADRATIC, 4] == 1
    policy.samples[Mode.QUADRATIC, 4] = TRUSTED_SAMPLES
    assert policy.choose(batch_of_two, now + 1e6) is Mode.AR


def test_a_mode_is_measured_again_when_that_costs_at_most_its_share_of_the_time(batch_of_two):
    """AR is the best (2 tokens / 1 ms) and runs; self-spec (1.5 / 1 ms) is run again once
    EXPLORE_SHARE of the time since it last ran pays for that visit (two cycles), quadratic (30 / 20 ms)
    20x later; a mode estimated below EXPLORE_RATIO of the best's rate never is."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 1e-3, Mode.QUADRATIC: 20e-3}, {Mode.SELF_SPEC: 0.75, Mode.QUADRATIC: 15}
    )
    now, since = NOW + 10, {}  # seconds since each mode last ran

    def choose() -> Mode:
        for mode in CHOICES:
            policy.last_run[mode, 4] = now - since.get(mode, 0.0)  # AR just ran
        return policy.choose(batch_of_two, now)

    since = {Mode.SELF_SPEC: 2 * 0.9e-3 / EXPLORE_SHARE, Mode.QUADRATIC: 2 * 19e-3 / EXPLORE_SHARE}
    assert choose() is Mode.AR
    since[Mode.SELF_SPEC] = 2 * 1.1e-3 / EXPLORE_SHARE
    assert choose() is Mode.SELF_SPEC
    since = {Mode.QUADRATIC: 2 * 21e-3 / EXPLORE_SHARE}
    assert choose() is Mode.QUADRATIC
    policy.acceptance[Mode.QUADRATIC, 4] = 0.99 * EXPLORE_RATIO * 20  # now below EXPLORE_RATIO x AR's rate
    since = {Mode.QUADRATIC: 1e6}
    assert choose() is Mode.AR


def test_a_new_batch_size_is_estimated_not_measured_again(batch_of_two):
    """Measured at batch size 1 only (AR also at 2): at 2 a mode's time is its time at 1 scaled as
    AR's, and nothing is forced to run again."""
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 3e-3, Mode.QUADRATIC: 1.6e-3}, {Mode.SELF_SPEC: 3, Mode.QUADRATIC: 2}, b=1
    )
    policy.seconds[Mode.AR, 2, 4] = 1.5e-3
    assert policy.step_seconds(Mode.QUADRATIC, 2, 4) == pytest.approx(2.4e-3)
    assert policy.step_seconds(Mode.SELF_SPEC, 8, 4) == pytest.approx(4.5e-3)  # AR not at 8: its time at 2
    assert policy.choose(batch_of_two, NOW) is Mode.QUADRATIC  # 4 tokens / 2.4 ms over AR's 2 / 1.5 ms


def test_a_quadratic_cycle_without_drafts_is_not_counted(tiny):
    """Right after another mode the drafts are gone: that cycle accepts 1 by construction."""
    prompts = prompts_of(tiny)[:1]
    engine = Engine(tiny.model, EngineConfig(max_slots=1, max_seq_len=128))
    settings = GenerationSettings(mode=Mode.AUTO, block_length=4, max_new_tokens=30, ignore_eos=True)
    seq = engine.add(prompts[0], settings.sampling, settings.decoding)
    policy = engine.policies[Mode.AUTO]
    policy.choose = lambda batch: Mode.QUADRATIC  # one quadratic cycle after the prefill: no drafts yet
    engine.step()
    engine.step()
    assert seq.stats.accepted_lengths == [1] and Mode.QUADRATIC not in seq.acceptance
    engine.step()
    assert Mode.QUADRATIC in seq.acceptance
    policy.choose = lambda batch: Mode.AR
    engine.step()
    assert seq.drafts is None  # AR moved the cache on: the next quadratic cycle drafts afresh


def test_admission_reserves_for_the_mode_run_last_and_before_any_for_quadratic(batch_of_two):
    policy = AutoPolicy({})
    policy.seed({"block_length": 4, "seconds": {"ar": {"2": 1e-3}, "quadratic": {"2": 2e-3}}})
    assert policy.last_mode(4) is Mode.QUADRATIC  # build times ran nothing here
    policy.record(batch_of_two, Mode.AR, 1e-3, [False, False])
    assert policy.last_mode(4) is Mode.AR and policy.last_mode(8) is Mode.QUADRATIC


def test_one_lucky_cycle_moves_a_sequences_acceptance_from_the_mean_not_to_itself(batch_of_two):
    policy = _policy_with(
        {Mode.AR: 1e-3, Mode.SELF_SPEC: 2e-3, Mode.QUADRATIC: 2e-3}, {Mode.SELF_SPEC: 3.0, Mode.QUADRATIC: 2.0}
    )
    for seq in batch_of_two.seqs:
        seq.stats.accepted_lengths.append(8)
    policy.record(batch_of_two, Mode.SELF_SPEC, 2e-3, [True, True])
    assert [seq.acceptance[Mode.SELF_SPEC] for seq in batch_of_two.seqs] == [
        pytest.approx(4.0)
    ] * 2  # 0.8 x 3 + 0.2 x 8


def test_the_acceptance_over_every_sequence_is_their_tokens_over_their_cycles(batch_of_two):
    """Sampled a cycle at a time between AR steps, a sequence that accepts 8 a cycle is met as often
    as one that accepts 2, but a run of both gives 2 x 8 tokens in 1 + 4 cycles: 3.2 a cycle, the
    mean's harmonic (the plain mean, 5, sent requests to self-spec that ran 0.75x AR). It moves by
    POOLED_ALPHA a cycle once it has 1 / POOLED_ALPHA of them."""
    policy = AutoPolicy({})
    for n, seq in zip([2, 8], batch_of_two.seqs):
        seq.stats.accepted_lengths.append(n)
    policy.record(batch_of_two, Mode.SELF_SPEC, None, [True, True])
    assert policy.acceptance[Mode.SELF_SPEC, 4] == pytest.approx(3.2)
    policy.samples[Mode.SELF_SPEC, 4] = 10_000
    policy.record(batch_of_two.subset([0]), Mode.SELF_SPEC, None, [True])
    expected = 1 / ((1 - POOLED_ALPHA) / 3.2 + POOLED_ALPHA / 2)
    assert policy.acceptance[Mode.SELF_SPEC, 4] == pytest.approx(expected)


@pytest.mark.parametrize("runs", [Mode.AR, Mode.QUADRATIC])
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
    cycle = 1 if runs is Mode.AR else 20  # a quadratic chunk: 4 x 5
    engine.step()  # prefill
    while engine.has_work:
        lengths = {seq.id: engine.runner.host_lengths[seq.held_slot] for seq in seqs if not seq.is_finished}
        engine.step()
        for seq in (s for s in seqs if not s.is_finished):
            assert len(seq.kv.blocks) == -(-(lengths[seq.id] + cycle) // 4)
    assert tokens_of(seqs) == tokens_of(run(tiny, Mode.AR, prompts, ignore_eos=True, max_new_tokens=12))
