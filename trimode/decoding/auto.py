"""`auto`: the lossless mode that gives the most tokens per second now, chosen at every step.

At temperature 0 AR, linear self-spec and quadratic self-spec emit the same tokens at every block
length (spec §7, spec/quadratic.md), so the engine may switch a request between them, and between
block lengths, at any cycle. A choice is a mode and its block length (AR's is 0: it has none); a
request that names a block length keeps it, one that names none may run any block length the engine
runs (a built engine's `--block-lengths`; `Sequence.widths`). At every step the auto policy
estimates, for its group of sequences (one batch, the same widths), each choice's rate and runs the
best:

    rate(choice) = sum over the batch of E[tokens per cycle] / (seconds per step (choice, batch size)
                                                                + time outside the step)

- Seconds per step: a running mean of the choice's whole step (passes, host work, the host sync),
  measured here per batch size in runs of it, from a run's RUN_CYCLES-th cycle: on the CPU
  sandboxes a self-spec cycle after AR took 8 ms after 0.05 s of AR, 30 after 2 s, 50 after 5 s
  (its passes, with no page fault: memory left idle came back slowly), and a dozen cycles to fall
  to its 4 ms. Where the engine dir brought step times (`seed`: measured as it serves by `trimode
  bench --save-step-times`, else at its build), those stand in until a run is timed, scaled by
  AR's time here over AR's there, and a run's times move them rather than replace them. Without them each choice first runs until WARMUP_RUNS of its steps
  are timed (from a switch's second cycle: nothing better is known). At a batch size where a choice
  has no time, the nearest size's time stands in, scaled as AR's time scales between the two.
- Time outside auto's steps: what the engine and the server around it spend between two steps
  (scheduling, streaming the tokens out, other sequences' steps), about the same per step in every
  mode, so it counts against the mode of short steps: the median of the last GAPS gaps (a median:
  an idle server or a prefill now and then makes a gap of any length). In `trimode bench` at c=1 it
  was 0.16 ms a step, 12% of an AR step and 2% of a self-spec one.
- Tokens per cycle: each sequence's running mean for that choice (AR: 1). It starts from the mean
  over every sequence so far, so one lucky cycle does not send a batch
  to a slower choice. That pooled mean is harmonic, tokens over cycles (visits between AR steps meet
  a request that accepts 8 a cycle as often as one that accepts 2, which takes 4x the cycles), and
  slow (POOLED_ALPHA): requests differ 4x in acceptance. Each block length has its own: a block
  of 4 accepts at most 4, and a request that accepts 7 of 8 runs 8 best. A choice nobody has run yet
  takes its mode's at the nearest block length that ran, as the same chance per draft token
  (`agreement`: 3.6 of 4 says 6.3 of 8; on CPU, self-spec/4 at 3.6 ran 1.2x AR and kept self-spec/8,
  which ran 1.6x, from a visit); none ran: EXPLORE_AGREEMENT a token (1.5 at block 2, 2 at 8).
- Switching costs what the first RUN_CYCLES - 1 cycles after it take beyond the choice's time,
  measured at each switch (the CPU figures above; about nothing on a GPU). A switch to a faster choice
  is made only if it is SWITCH_GAIN faster (so a batch does not flap between two of equal
  rate) and while the time it saves on the tokens the batch may still emit exceeds the round trip. A
  switch away from AR runs at least two cycles at the same batch size (a quadratic cycle after
  another mode or block length has no drafts: it accepts 1 and is not counted in the quadratic mean; an engine
  without build times times the second), and as many as make the round trip cost no more than their
  time, up to RUN_CYCLES (`visit_cycles`: a visit that paid 50 ms to switch learns from 8 cycles,
  not 2). A visit that is over stays only if SWITCH_GAIN faster than the choice it left, which ran a
  moment ago, so going back costs about nothing (with the cost of a switch after seconds idle, a
  visit to AR from self-spec kept the batch in AR: going back would not pay). While AR runs the same
  sequences only times change, so the choice stands for RECHOOSE_CYCLES (choosing at every step cost
  1.5% of an AR step on CPU); a speculative choice, whose acceptance moves every cycle, stands for
  RECHOOSE_SPECULATIVE (choosing among seven at every cycle cost 2.5% of a self-spec/8 cycle).
- Re-measuring. Every choice emits the same tokens, so exploring loses no text, only time. A choice
  not run lately runs again (acceptance, load and batch sizes drift) once one visit to it, round
  trip included, costs at most its part of EXPLORE_SHARE of the time spent in steps since it last
  ran (`busy`: time idle is none spent on the best choice), and only while its rate is within
  EXPLORE_RATIO of the best's; the choices within it split EXPLORE_SHARE (with a share each, an
  engine of block lengths 2, 4 and 8 spent 3% of its time re-measuring three self-specs on
  requests where AR won). (On CPU a quadratic step at batch 8 took 17x an AR step: re-measuring it
  every 64 steps cost auto a quarter of its speed.) A choice with fewer than TRUSTED_SAMPLES
  acceptance samples is visited at once if it would beat the best accepting HOPED_SHARE of each
  block (it waited to be stale like the others: a fresh engine at c=4 ran AR for its first 1.4 s of
  steps, a bench's whole level, on requests where self-spec/8 ran 1.18x AR; it costs one visit a
  choice, once, since the samples pool over every sequence): a build time says how long a step takes, not how many tokens it gives, and the prior alone would keep a choice that
  runs 1.2x AR on these requests from ever running (the adapter's best requests take 92% of a
  block, the held-out ones 37%: at half a block, self-spec/8 timed at the serving threads, 4.4 ms a
  step at batch 1 against AR's 0.95, was never tried on requests where it ran 1.9x AR; quadratic/8
  at 7.3 ms still is not). Of the choices due a visit, the one of the highest
  rate, hoped or estimated, goes first (in the order of `choices`, a self-spec/2 and a quadratic/2
  that could not win went before a self-spec/8 that ran 1.6x AR, and cost auto a third at c=1).
At temperature > 0 every mode samples the same distribution, but which mode ran depends on
timing: a seed does not reproduce a sampled text.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass

from trimode.decoding.ar import emit_pending, is_whole_step
from trimode.decoding.batch import Batch
from trimode.decoding.settings import DecodeConfig
from trimode.passes import Mode

SPECULATIVE = (Mode.SELF_SPEC, Mode.QUADRATIC)  # the modes auto runs at a block length, besides AR
Choice = tuple[Mode, int]  # a mode and its block length (module doc)
AR: Choice = (Mode.AR, 0)  # AR has no block: one choice, one time, whatever the widths
ALPHA = 0.2  # weight of the newest sample in a running mean
POOLED_ALPHA = 0.01  # the same in the acceptance mean over every sequence (module doc)
EXPLORE_SHARE = 0.01  # of the time, at most, spent re-measuring the choices that are not the best
EXPLORE_RATIO = 0.7  # a choice estimated slower than this share of the best's rate is not re-measured
WARMUP_RUNS = 1  # timed runs of a choice before its time is trusted (after its untimed first: module doc)
RUN_CYCLES = 8  # cycles of a choice in a row before its step is timed, where it has build times (module doc)
SWITCH_GAIN = 1.05
GAPS = 32  # the gaps between steps whose median is each step's time outside auto (module doc)
RECHOOSE_CYCLES = 16  # AR cycles of the same sequences before the choice is made again
RECHOOSE_SPECULATIVE = 4  # the same for the other choices
EXPLORE_AGREEMENT = 0.5  # a choice nobody has run yet: each draft token assumed accepted this often (module doc)
TRUSTED_SAMPLES = 8  # cycles before a choice's acceptance may keep it from being re-measured
HOPED_SHARE = 0.75  # of a block, what a choice short of TRUSTED_SAMPLES may accept, if worth measuring


def choices(widths: tuple[int, ...]) -> list[Choice]:
    """What auto may run a group of these widths at: AR, then each speculative mode at each width."""
    return [AR, *((mode, width) for width in widths for mode in SPECULATIVE)]


@functools.cache  # every auto step counts its cycle under this name (a Mode's .value is slow)
def choice_name(choice: Choice) -> str:
    """As `trimode bench` names its variants: ar, self-spec/8, quadratic/4."""
    mode, width = choice
    return mode.value if mode is Mode.AR else f"{mode.value}/{width}"


def parse_choice(name: str) -> Choice:
    """choice_name's inverse (ValueError for anything else)."""
    mode, _, width = name.partition("/")
    choice = (Mode(mode), int(width) if width else 0)
    valid = choice == AR or (choice[0] in SPECULATIVE and choice[1] >= 1)
    if not valid or choice_name(choice) != name:
        raise ValueError(f"not a choice of auto: {name!r}")
    return choice


@dataclass
class Stint:
    """The cycles a group has run one choice in a row, the last one's batch size, and how much longer
    its first cycles took than the choice's time (what switching to it cost: module doc)."""

    choice: Choice
    cycles: int = 0
    batch_size: int = 0
    excess: float | None = None  # None: not a switch (the first stint), or nothing to compare with
    kept: tuple = ()  # while AR: the sequences it was last chosen for, and at which cycle
    kept_at: int = 0
    left: Choice | None = None  # a visit: the choice it left


class AutoPolicy:
    """State is kept per choice (times, acceptance, switch costs) and per group of widths (the stint
    it runs, a visit under way): `Sequence.widths`, the engine's grouping of auto's sequences."""

    def __init__(self, policies: dict):
        """policies: the engine's policies of AR and the SPECULATIVE modes (their step runs the chosen mode)."""
        self.policies = policies
        self.seconds: dict[tuple[Mode, int, int], float] = {}  # (mode, batch size, width) -> per step
        self.acceptance: dict[Choice, float] = {}  # over every sequence
        self.samples: Counter = Counter()  # choice -> cycles in that mean
        self.stints: dict[tuple[int, ...], Stint] = {}  # widths -> its current stint
        self.visiting: dict[tuple[int, ...], tuple[Choice, Choice]] = {}  # widths -> a visit chosen: (from, to)
        self.switch_seconds: dict[Choice, float] = {}  # a switch to it costs
        self.switches: Counter = Counter()  # choice -> switches in that mean
        # seconds spent in steps: the clock of re-measuring (time idle, or a bench's other variants'
        # turns, is none spent on the best choice: on the wall clock each bench round visited each)
        self.busy = 0.0
        self.gaps: deque[float] = deque(maxlen=GAPS)  # seconds from the end of one step to the start of the next
        self.last_end: float | None = None
        self.last_run: dict[Choice, float] = {}  # when it last ran (busy)
        self.runs: Counter = Counter()  # (mode, batch size, width) -> steps run and timed
        self.warm: set[tuple[int, ...]] = set()  # widths at which every choice has had its warm-up runs
        self.prior: dict[tuple[Mode, int, int], float] = {}  # as seconds, measured at the engine's build (seed)
        self.seeded: set[Choice] = set()  # with build times

    def seed(self, prior: dict) -> None:
        """Start from the step times the engine dir brought ({choice name: {batch size: seconds}},
        BuiltEngine.step_times: measured as it serves by `trimode bench`, step_times.py, else at its
        build, engine_dir.auto_prior; "build times" below). A choice with build times
        needs no warm-up runs, so the first steps already run the choice of the best estimated rate.
        Times measured here always win; a build time stands where none is, scaled as AR's time here is
        to AR's at the build (another thread count or load changes every mode alike: unscaled, a mode
        measured at the build with more threads looked faster than it runs here, and auto kept trying it)."""
        for name, by_size in prior.items():
            mode, width = choice = parse_choice(name)
            for size, seconds in by_size.items():
                self.prior[mode, int(size), width] = seconds
            self.last_run[choice] = self.busy
            self.seeded.add(choice)

    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        """The choice the engine made for these sequences before growing their blocks (Engine.step:
        every one of them grew for it), else one made now. A sequence that runs another width than
        its last drops its drafts (a quadratic cycle's are one block's). With async AR steps (ar.py) a
        sequence that ran AR last has its next token still in flight: another mode first emits it (a
        token that ends the sequence leaves it out of the cycle)."""
        choice = batch.seqs[0].auto_choice or self.choose(batch)
        mode, width = choice
        for seq in batch.seqs:
            seq.auto_choice = None
            if mode is not Mode.AR and seq.block_length != width:
                seq.block_length, seq.drafts = width, None
        if mode is Mode.AR:  # nothing to settle: a token in flight is AR's own
            return self.run(batch, choice, config)
        settled = [[] if s.pending is None else emit_pending(s, s.pending) for s in batch.seqs]
        live = [i for i, s in enumerate(batch.seqs) if not s.finish_reason]
        if not live:
            return settled
        sub = batch if len(live) == len(batch) else batch.subset(live)
        for i, tokens in zip(live, self.run(sub, choice, config)):
            settled[i] += tokens
        return settled

    def run(self, batch: Batch, choice: Choice, config: DecodeConfig) -> list[list[int]]:
        """One step of choice's policy, timed and recorded."""
        had_drafts = [] if choice == AR else [s.drafts is not None for s in batch.seqs]
        policy = self.policies[choice[0]]
        timed = is_whole_step(policy, batch)
        started = time.perf_counter()
        if self.last_end is not None:
            self.gaps.append(started - self.last_end)
        new = policy.step(batch, config)
        self.last_end = time.perf_counter()
        seconds = self.last_end - started
        self.busy += seconds
        self.record(batch, choice, seconds if timed else None, had_drafts)
        return new

    def choose(self, batch: Batch, now: float | None = None) -> Choice:
        b, widths = len(batch), batch.seqs[0].widths
        now = self.busy if now is None else now
        if widths not in self.warm:  # measure first
            unmeasured = self.unmeasured(choices(widths))
            if unmeasured is not None:
                return unmeasured
            self.warm.add(widths)
        stint = self.stints.get(widths) or Stint(AR)
        current = stint.choice
        running = stint.cycles < RUN_CYCLES and stint.cycles < self.visit_cycles(current, b)  # at most RUN_CYCLES
        if (stint.batch_size == b and running) or self.is_learning(stint):
            return current  # a switch runs its cycles (module doc)
        ids = tuple([s.id for s in batch.seqs])
        if stint.kept == ids and stint.cycles < stint.kept_at + (
            RECHOOSE_CYCLES if current == AR else RECHOOSE_SPECULATIVE
        ):
            return current  # little changed since (module doc)
        stint.kept, stint.kept_at = ids, stint.cycles
        options = choices(widths)
        outside = statistics.median(self.gaps) if self.gaps else 0.0
        seconds = {c: self.step_seconds(c, b) + outside for c in options}
        rates = {c: self.expected_batch_tokens(batch, c) / seconds[c] for c in options}
        best = max(rates, key=rates.__getitem__)
        if stint.left is not None:  # a visit is over (module doc)
            left, stint.left = stint.left, None
            return current if rates[current] >= SWITCH_GAIN * rates[left] else left
        hoped = {c: self.hoped_rate(c, b, seconds) for c in options}
        near = [c for c in options if c != current and rates[c] >= EXPLORE_RATIO * rates[best]]
        due = [c for c in options if c != current and hoped[c] > rates[best]]
        due += [c for c in near if self.is_stale(c, current, b, now, seconds, EXPLORE_SHARE / len(near))]
        if due:  # what might be the best and is untried, or was not run for a while: the most promising first
            visit = max(due, key=lambda c: max(rates[c], hoped[c]))
            self.visiting[widths] = (current, visit)
            return visit
        if rates[best] < SWITCH_GAIN * rates[current]:
            return current
        owed = sum(s.room for s in batch.seqs)  # tokens, at most
        saved = owed / rates[current] - owed / rates[best]
        return best if saved > self.round_trip(current, best) else current

    def visit_cycles(self, choice: Choice, b: int) -> int:
        """Cycles a switch to choice runs before auto chooses again: AR 1; another choice 2, or as many
        as make the round trip from AR cost no more than their time, up to RUN_CYCLES (on CPU a switch
        cost 10x a self-spec cycle: two-cycle visits paid it for two acceptance samples a time)."""
        if choice == AR:
            return 1
        trip = self.round_trip(AR, choice)
        return max(2, min(RUN_CYCLES, math.ceil(trip / self.step_seconds(choice, b))))

    def is_learning(self, stint: Stint) -> bool:
        """Whether a stint runs on to give its choice TRUSTED_SAMPLES of acceptance, whatever the batch
        size does meanwhile (two-cycle visits to an untried quadratic/8 gave one each, its first cycle
        after a switch none: 7 round trips to learn it); every cycle after the first gives one at
        least, so this ends."""
        return stint.choice != AR and self.samples[stint.choice] < TRUSTED_SAMPLES and stint.cycles <= TRUSTED_SAMPLES

    def round_trip(self, current: Choice, other: Choice) -> float:
        """Seconds a switch from current to other and back costs beyond their cycles' times."""
        switch = self.switch_seconds
        return switch.get(other, 0.0) + switch.get(current, 0.0) if other != current else 0.0

    def unmeasured(self, options: list[Choice]) -> Choice | None:
        """A choice without a build time (seed) still owed its WARMUP_RUNS."""
        for mode, width in options:
            if (mode, width) in self.seeded:
                continue
            if sum(n for (m, _, w), n in self.runs.items() if m is mode and w == width) < WARMUP_RUNS:
                return mode, width
        return None

    def known(self, choice: Choice) -> bool:
        """Whether step_seconds has a time of this choice to estimate from."""
        return any((m, w) == choice for m, _, w in (*self.seconds, *self.prior))

    def is_stale(self, choice: Choice, current: Choice, b: int, now: float, seconds: dict, share: float) -> bool:
        """Not run for so long that one visit, round trip included, costs this share of the time since."""
        visit = seconds[choice] * self.visit_cycles(choice, b) + self.round_trip(current, choice)
        return now - self.last_run[choice] > visit / share

    def hoped_rate(self, choice: Choice, b: int, seconds: dict) -> float:
        """The rate of a choice with fewer than TRUSTED_SAMPLES cycles of acceptance here (0 for others),
        accepting HOPED_SHARE of each block: a build time says how long a step takes, not how many
        tokens it gives, and a request's first cycles may accept little (on CPU, every draft accepted
        kept a quadratic step of 8 ms worth measuring against a 1 ms AR one: 3-6% of a short bench).
        AR gives one token a sequence: its rate is known."""
        if choice == AR or self.samples[choice] >= TRUSTED_SAMPLES:
            return 0.0
        return b * choice[1] * HOPED_SHARE / seconds[choice]

    def last_choice(self, widths: tuple[int, ...]) -> Choice:
        """The choice run last at these widths (before any: quadratic at the longest, which writes the most)."""
        return self.stints[widths].choice if widths in self.stints else (Mode.QUADRATIC, max(widths))

    def expected_batch_tokens(self, batch: Batch, choice: Choice) -> float:
        """Expected tokens of one step of choice over this batch (its rate: this / step_seconds)."""
        if choice == AR:
            return float(len(batch))
        mean = self.pooled_acceptance(choice)  # a sequence's own comes first
        return sum(s.acceptance.get(choice, mean) for s in batch.seqs)

    def pooled_acceptance(self, choice: Choice) -> float:
        """Tokens per cycle over every sequence; of a choice not run yet, from its mode's at the nearest
        block length that ran, as the same agreement per draft token (module doc)."""
        if choice in self.acceptance:
            return self.acceptance[choice]
        mode, width = choice
        ran = [w for m, w in self.acceptance if m is mode]
        if not ran:
            return block_acceptance(EXPLORE_AGREEMENT, width)
        near = min(ran, key=lambda w: (abs(w - width), w))
        return block_acceptance(agreement(self.acceptance[mode, near], near), width)

    def step_seconds(self, choice: Choice, b: int) -> float:
        """Measured at batch size b; else the build's time there, scaled as AR's time here is to AR's at
        the build (build_scale); else the estimate at the nearest batch size with a time (measured
        before built, at equal distance), scaled as AR's (estimated) time scales between the two."""
        mode, width = choice
        if (mode, b, width) in self.seconds:
            return self.seconds[mode, b, width]
        if (mode, b, width) in self.prior:
            return self.prior[mode, b, width] * self.build_scale(b)
        sizes = {size for m, size, w in (*self.seconds, *self.prior) if (m, w) == choice}
        near = min(sizes, key=lambda size: (abs(size - b), (mode, size, width) not in self.seconds, size))
        estimate = self.step_seconds(choice, near)
        if choice == AR:
            return estimate
        return estimate * self.step_seconds(AR, b) / self.step_seconds(AR, near)

    def build_scale(self, b: int) -> float:
        """AR's measured time over its build time, at the batch size nearest b that has both (1: none).
        Another thread count or load changes every mode alike: unscaled, a build time at a batch size
        where AR had not run yet here made self-spec look 3x faster than it ran, and auto ran it."""
        both = [size for m, size, _ in self.seconds if m is Mode.AR and (m, size, 0) in self.prior]
        if not both:
            return 1.0
        near = min(both, key=lambda size: (abs(size - b), size))
        return self.seconds[Mode.AR, near, 0] / self.prior[Mode.AR, near, 0]

    def switched(self, stint: Stint) -> None:
        """A switch's cost, once its first cycles are over: their time beyond the choice's (at least 0)."""
        if stint.excess is not None:
            self.switches[stint.choice] += 1
            count = self.switches[stint.choice]
            old = self.switch_seconds.get(stint.choice)
            self.switch_seconds[stint.choice] = _mean(old, max(stint.excess, 0.0), count)

    def record(self, batch: Batch, choice: Choice, seconds: float | None, had_drafts: list[bool]) -> None:
        """seconds: the step's time (None: not a whole step's); had_drafts: which sequences had drafts
        (a quadratic cycle without counts no acceptance). Counted (`runs`) from the second cycle
        of a choice in a row; for one with build times, from the RUN_CYCLES-th, and it moves the
        estimate auto used (the build time, scaled) rather than replacing it (module doc)."""
        b, widths = len(batch), batch.seqs[0].widths
        mode, width = choice
        key = (mode, b, width)
        stint = self.stints.get(widths)
        if stint is None or stint.choice != choice:
            if stint is not None and stint.cycles < RUN_CYCLES - 1:
                self.switched(stint)  # ended before its first cycles were over
            left, visited = self.visiting.pop(widths, (None, None))
            stint = self.stints[widths] = Stint(choice, excess=0.0 if stint is not None else None)
            stint.left = left if visited == choice else None
        stint.cycles, stint.batch_size = stint.cycles + 1, b
        built = choice in self.seeded
        if stint.excess is not None and stint.cycles < RUN_CYCLES and seconds is not None:
            if self.known(choice):
                stint.excess += seconds - self.step_seconds(choice, b)
            else:
                stint.excess = None
        if stint.cycles == RUN_CYCLES - 1:
            self.switched(stint)
        if seconds is not None and stint.cycles >= (RUN_CYCLES if built else 2):
            start = self.seconds.get(key) or (self.step_seconds(choice, b) if built else None)
            self.seconds[key] = _mean(start, seconds)
            self.runs[key] += 1
        self.last_run[choice] = self.busy
        name, drop_drafts = choice_name(choice), mode is not Mode.QUADRATIC
        for seq in batch.seqs:
            seq.stats.auto_cycles[name] += 1
            if drop_drafts:
                seq.drafts = None  # the cache moved on: a quadratic cycle after this one drafts afresh
        if mode is Mode.AR:
            return
        prior = self.acceptance.get(choice)  # the mean before this step: every sequence starts from it
        for seq, drafted in zip(batch.seqs, had_drafts):
            if mode is Mode.QUADRATIC and not drafted:
                continue
            n = seq.stats.accepted_lengths[-1]
            seq.acceptance[choice] = _mean(seq.acceptance.get(choice, prior), n)  # one lucky cycle moves it 20%
            self.samples[choice] += 1
            inverse = 1 / self.acceptance[choice] if choice in self.acceptance else None
            self.acceptance[choice] = 1 / _mean(inverse, 1 / n, self.samples[choice], POOLED_ALPHA)


def block_acceptance(p: float, width: int) -> float:
    """Tokens per cycle of a block of width whose draft tokens are each taken with probability p until
    the first that is not (the verifier's token there, or after the last, counted): 1 + p + .. + p^(W-1)."""
    return (1 - p**width) / (1 - p)


def agreement(accepted: float, width: int) -> float:
    """The p for which block_acceptance(p, width) is accepted (bisection; a whole block: 0.999)."""
    low, high = 0.0, 0.999
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if block_acceptance(mid, width) < accepted else (low, mid)
    return low


def _mean(old: float | None, new: float, count: int = 0, alpha: float = ALPHA) -> float:
    """A running mean: the newest sample weighs alpha, or 1/count while that is more (the plain mean of
    the first 1/alpha samples: the first of them alone would otherwise weigh 80% of the mean for a while)."""
    weight = max(alpha, 1 / count) if count else alpha
    return new if old is None else (1 - weight) * old + weight * new
