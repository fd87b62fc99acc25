"""`auto`: the lossless mode that gives the most tokens per second now, chosen at every step.

At temperature 0 AR, linear self-spec and quadratic self-spec emit the same tokens (spec §7,
spec/quadratic.md), so the engine may switch a request between them at any cycle. At every step
the auto policy estimates, for its group of sequences (one batch, one block length), each mode's
rate and runs the best:

    rate(mode) = sum over the batch of E[tokens per cycle] / seconds per step (mode, batch size)

- Seconds per step: a running mean of the mode's whole step (passes, host work, the host sync),
  measured here per batch size. Where the engine dir brought step times measured at its build
  (`seed`), those stand in until a mode has run, scaled by AR's time here over AR's at the build.
  Without them each mode first runs until WARMUP_RUNS of its steps are timed. At a batch size
  where a mode has no time, the nearest size's time stands in, scaled as AR's time scales between
  the two.
- Tokens per cycle: each sequence's running mean for that mode (AR: 1). It starts from the mean
  over every sequence so far (none yet: EXPLORE_PRIOR), so one lucky cycle does not send a batch
  to a slower mode.
- Re-measuring. Every mode emits the same tokens, so exploring loses no text, only time. A mode
  not run lately runs again (acceptance, load and batch sizes drift) once one visit to it costs at
  most EXPLORE_SHARE of the time since it last ran, and only while its rate is within EXPLORE_RATIO
  of the best's. (On CPU a quadratic step at batch 8 took 17x an AR step: re-measuring it every 64
  steps cost auto a quarter of its speed.) A mode with fewer than TRUSTED_SAMPLES acceptance
  samples is also visited if it would beat the best accepting HOPED_SHARE of each block: a build
  time says how long a step takes, not how many tokens it gives, and EXPLORE_PRIOR alone would
  keep a mode that runs 1.2x AR on these requests from ever running.
- Switching. A switch runs two cycles at the same batch size and times only the second (on CPU a
  self-spec cycle among AR steps took 6-7 ms, one in a run of them 3.4: cold caches). A quadratic
  cycle after another mode has no drafts (it accepts 1) and is not counted in the quadratic mean.
  The current mode is kept unless another is SWITCH_GAIN better, so a batch does not flap between
  two modes of equal rate.
At temperature > 0 every mode samples the same distribution, but which mode ran depends on
timing: a seed does not reproduce a sampled text.
"""

from __future__ import annotations

import time
from collections import Counter

from trimode.decoding.ar import AsyncARPolicy, emit_pending
from trimode.decoding.batch import Batch
from trimode.decoding.settings import DecodeConfig
from trimode.passes import Mode

CHOICES = (Mode.AR, Mode.SELF_SPEC, Mode.QUADRATIC)
ALPHA = 0.2  # weight of the newest sample in a running mean
EXPLORE_SHARE = 0.01  # of the time, at most, spent re-measuring each mode that is not the best
EXPLORE_RATIO = 0.7  # a mode estimated slower than this share of the best's rate is not re-measured
WARMUP_RUNS = 1  # timed runs of a mode before its time is trusted (after its untimed first: module doc)
SWITCH_GAIN = 1.05
EXPLORE_PRIOR = 2.0  # tokens per cycle assumed for a speculative mode nobody has run yet
TRUSTED_SAMPLES = 8  # cycles before a mode's acceptance may keep it from being re-measured
HOPED_SHARE = 0.5  # of a block, what a mode short of TRUSTED_SAMPLES may accept, if worth measuring


class AutoPolicy:
    def __init__(self, policies: dict):
        """policies: the engine's policies of the CHOICES modes (their step runs the chosen mode)."""
        self.policies = policies
        self.seconds: dict[tuple[Mode, int, int], float] = {}  # (mode, batch size, block length) -> per step
        self.acceptance: dict[tuple[Mode, int], float] = {}  # (mode, block length) -> over every sequence
        self.samples: Counter = Counter()  # (mode, block length) -> cycles in that mean
        # block length -> the mode run last, cycles of it in a row, and the batch size of the last one
        self.streak: dict[int, tuple[Mode, int, int]] = {}
        self.last_run: dict[tuple[Mode, int], float] = {}  # (mode, block length) -> when it last ran (perf_counter)
        self.runs: Counter = Counter()  # (mode, batch size, block length) -> steps run and timed
        self.warm: set[int] = set()  # block lengths at which every mode has had its warm-up runs
        self.prior: dict[tuple[Mode, int, int], float] = {}  # as seconds, measured at the engine's build (seed)

    def seed(self, prior: dict) -> None:
        """Start from step times measured where the engine was built (its manifest's `auto`:
        builder/engine_dir.auto_prior). A mode with build times needs no warm-up runs, so the first
        steps already run the mode of the best estimated rate. Times measured here always win; a
        build time stands where none is, scaled as AR's time here is to AR's at the build (another
        thread count or load changes every mode alike: unscaled, a mode measured at the build with
        more threads looked faster than it runs here, and auto kept trying it)."""
        width, now = prior["block_length"], time.perf_counter()
        for name, by_size in prior["seconds"].items():
            mode = Mode(name)
            for size, seconds in by_size.items():
                self.prior[mode, int(size), width] = seconds
            self.last_run[mode, width] = now

    def step(self, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        """The mode the engine chose for these sequences before growing their blocks (Engine.step:
        every one of them grew for it), else one chosen now. With async AR steps (ar.py) a sequence
        that ran AR last has its next token still in flight: another mode first emits it (a token
        that ends the sequence leaves it out of the cycle)."""
        mode = batch.seqs[0].auto_mode or self.choose(batch)
        for seq in batch.seqs:
            seq.auto_mode = None
        settled = [[] if mode is Mode.AR or s.pending is None else emit_pending(s, s.pending) for s in batch.seqs]
        live = [i for i, s in enumerate(batch.seqs) if not s.finish_reason]
        if not live:
            return settled
        sub = batch if len(live) == len(batch) else batch.subset(live)
        had_drafts = [s.drafts is not None for s in sub.seqs]
        # an async AR step with no token in flight to wait for only launches its pass: not a step's time
        policy = self.policies[mode]
        timed = not isinstance(policy, AsyncARPolicy) or any(s.pending is not None for s in sub.seqs)
        started = time.perf_counter()
        new = policy.step(sub, config)
        self.record(sub, mode, time.perf_counter() - started if timed else None, had_drafts)
        for i, tokens in zip(live, new):
            settled[i] += tokens
        return settled

    def choose(self, batch: Batch, now: float | None = None) -> Mode:
        b, width = len(batch), batch.seqs[0].block_length
        now = time.perf_counter() if now is None else now
        if width not in self.warm:  # measure first
            unmeasured = self.unmeasured(b, width)
            if unmeasured is not None:
                return unmeasured
            self.warm.add(width)
        current, streak, size = self.streak.get(width, (Mode.AR, 0, b))
        if streak == 1 and current is not Mode.AR and size == b:
            return current  # a switch runs two cycles: the first is not timed (module doc)
        seconds = {mode: self.step_seconds(mode, b, width) for mode in CHOICES}
        rates = {mode: self.expected_batch_tokens(batch, mode) / seconds[mode] for mode in CHOICES}
        best = max(rates, key=rates.__getitem__)
        for mode in CHOICES:  # then refresh what was not run for a while, if it might be the best
            visit = seconds[mode] * (1 if mode is Mode.AR else 2)  # a switch runs two cycles
            stale = now - self.last_run[mode, width] > visit / EXPLORE_SHARE
            if stale and self.may_win(mode, b, width, rates, best, seconds):
                return mode
        return current if rates[best] < SWITCH_GAIN * rates[current] else best

    def unmeasured(self, b: int, width: int) -> Mode | None:
        """A mode without a build time (seed) still owed its WARMUP_RUNS at this block length."""
        for mode in CHOICES:
            if any(m is mode and w == width for m, _, w in self.prior):
                continue
            if sum(n for (m, _, w), n in self.runs.items() if m is mode and w == width) < WARMUP_RUNS:
                return mode
        return None

    def may_win(self, mode: Mode, b: int, width: int, rates: dict, best: Mode, seconds: dict) -> bool:
        """Worth re-measuring: estimated within EXPLORE_RATIO of the best's rate, or, while fewer than
        TRUSTED_SAMPLES cycles of it have given an acceptance here (a build time says how long a step
        takes, not how many tokens it gives; a request's first cycles may accept little), faster than
        the best accepting HOPED_SHARE of each block (on CPU, every draft accepted kept a quadratic
        step of 8 ms worth measuring against a 1 ms AR one: 3-6% of a short bench)."""
        if rates[mode] >= EXPLORE_RATIO * rates[best]:
            return True
        hoped = b * width * HOPED_SHARE / seconds[mode]
        return self.samples[mode, width] < TRUSTED_SAMPLES and hoped > rates[best]

    def last_mode(self, width: int) -> Mode:
        """The mode run last at this block length (before any: quadratic, which writes the most)."""
        ran = [mode for mode in CHOICES if (mode, width) in self.last_run]
        return max(ran, key=lambda mode: self.last_run[mode, width]) if ran else Mode.QUADRATIC

    def expected_batch_tokens(self, batch: Batch, mode: Mode) -> float:
        """Expected tokens of one step of mode over this batch (its rate: this / step_seconds)."""
        if mode is Mode.AR:
            return float(len(batch))
        mean = self.acceptance.get((mode, batch.seqs[0].block_length), EXPLORE_PRIOR)  # a sequence's own comes first
        return sum(s.acceptance.get(mode, mean) for s in batch.seqs)

    def step_seconds(self, mode: Mode, b: int, width: int) -> float:
        """Measured at batch size b; else the build's time there, scaled as AR's time here is to AR's at
        the build (build_scale); else the estimate at the nearest batch size with a time (measured
        before built, at equal distance), scaled as AR's (estimated) time scales between the two."""
        if (mode, b, width) in self.seconds:
            return self.seconds[mode, b, width]
        if (mode, b, width) in self.prior:
            return self.prior[mode, b, width] * self.build_scale(b, width)
        sizes = {size for m, size, w in (*self.seconds, *self.prior) if m is mode and w == width}
        near = min(sizes, key=lambda size: (abs(size - b), (mode, size, width) not in self.seconds, size))
        estimate = self.step_seconds(mode, near, width)
        if mode is Mode.AR:
            return estimate
        return estimate * self.step_seconds(Mode.AR, b, width) / self.step_seconds(Mode.AR, near, width)

    def build_scale(self, b: int, width: int) -> float:
        """AR's measured time over its build time, at the batch size nearest b that has both (1: none).
        Another thread count or load changes every mode alike: unscaled, a build time at a batch size
        where AR had not run yet here made self-spec look 3x faster than it ran, and auto ran it."""
        both = [size for m, size, w in self.seconds if m is Mode.AR and w == width and (m, size, w) in self.prior]
        if not both:
            return 1.0
        near = min(both, key=lambda size: (abs(size - b), size))
        return self.seconds[Mode.AR, near, width] / self.prior[Mode.AR, near, width]

    def record(self, batch: Batch, mode: Mode, seconds: float | None, had_drafts: list[bool]) -> None:
        """seconds: the step's time (None: not a whole step's). Counted (`runs`) only after a cycle of
        the same mode."""
        b, width = len(batch), batch.seqs[0].block_length
        key = (mode, b, width)
        last, streak, _ = self.streak.get(width, (None, 0, b))
        self.streak[width] = (mode, streak + 1 if last is mode else 1, b)
        if seconds is not None and last is mode:
            self.seconds[key] = _mean(self.seconds.get(key), seconds)
            self.runs[key] += 1
        self.last_run[mode, width] = time.perf_counter()
        prior = self.acceptance.get((mode, width))  # the mean before this step: every sequence starts from it
        name = mode.value
        for seq, drafted in zip(batch.seqs, had_drafts):
            seq.stats.auto_cycles[name] += 1
            if mode is not Mode.QUADRATIC:
                seq.drafts = None  # the cache moved on: a quadratic cycle after this one drafts afresh
            if mode is Mode.AR or (mode is Mode.QUADRATIC and not drafted):
                continue
            n = seq.stats.accepted_lengths[-1]
            seq.acceptance[mode] = _mean(seq.acceptance.get(mode, prior), n)  # one lucky cycle moves it 20%
            self.samples[mode, width] += 1
            self.acceptance[mode, width] = _mean(self.acceptance.get((mode, width)), n, self.samples[mode, width])


def _mean(old: float | None, new: float, count: int = 0) -> float:
    """A running mean: the newest sample weighs ALPHA, or 1/count while that is more (the plain mean of
    the first 1/ALPHA samples: the first of them alone would otherwise weigh 80% of the mean for a while)."""
    weight = max(ALPHA, 1 / count) if count else ALPHA
    return new if old is None else (1 - weight) * old + weight * new
