"""Step times of auto's choices as a serving engine runs them: what `trimode bench --save-step-times`
stores with an engine (engine_dir.save_step_times) for auto to start from instead of the build's.

A build times each choice on a short fixed prompt, 16 tokens a request (engine_dir.auto_prior).
Served on the held-out prompts, 64 tokens a request, the ratios to AR's step came out otherwise:
self-spec/8 4.0x AR's at batch 1 where the build said 4.6x, 6.8x at batch 8 where it said 6.0x
(2-core Intel Xeon, 2026-12-07, engine of block lengths 2, 4 and 8). Auto times a choice only in
runs of RUN_CYCLES cycles, which its short visits rarely reach, so it kept the build's ratios.
Started from the served times it ran at 0.99x the best fixed mode on average, from the build's
at 0.97x (docs/performance.md).

A table is {choice name: {batch size: seconds}} (choice_name: ar, self-spec/8, quadratic/4), the
median of a group's policy step at that batch size, as auto times its own steps (AutoPolicy.run),
from the RUN_CYCLES-th step of a choice in a row (the first after another mode ran slower on CPU).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque

from trimode.decoding.ar import is_whole_step
from trimode.decoding.auto import RUN_CYCLES, SPECULATIVE, choice_name
from trimode.decoding.batch import Batch
from trimode.decoding.settings import DecodeConfig
from trimode.passes import Mode

MIN_STEPS = 16  # timed steps of a choice at a batch size before its median is kept
MAX_STEPS = 4096  # the newest kept per choice and batch size


class StepTimes:
    """Times the steps of the fixed modes among auto's choices (Engine.step_times; auto times its own)."""

    def __init__(self):
        self.steps: dict[tuple[str, int], deque[float]] = defaultdict(lambda: deque(maxlen=MAX_STEPS))
        self.last: str | None = None  # the choice of the last step timed
        self.in_a_row = 0

    def run(self, policy, batch: Batch, config: DecodeConfig) -> list[list[int]]:
        """policy.step(batch, config), timed when it is one of auto's choices and a whole step."""
        mode = config.mode
        if mode is not Mode.AR and mode not in SPECULATIVE:
            return policy.step(batch, config)
        name = choice_name((mode, 0 if mode is Mode.AR else batch.seqs[0].block_length))
        whole = is_whole_step(policy, batch)
        started = time.perf_counter()
        new = policy.step(batch, config)
        seconds = time.perf_counter() - started
        self.in_a_row = self.in_a_row + 1 if name == self.last else 1
        self.last = name
        if whole and self.in_a_row >= RUN_CYCLES:
            self.steps[name, len(batch)].append(seconds)
        return new

    def table(self) -> dict[str, dict[str, float]]:
        """The median step of each choice at each batch size timed MIN_STEPS times at least."""
        out: dict[str, dict[str, float]] = {}
        for (name, size), steps in sorted(self.steps.items()):
            if len(steps) >= MIN_STEPS:
                out.setdefault(name, {})[str(size)] = statistics.median(steps)
        return out


def merge(new: dict, old: dict) -> dict:
    """new's times, and old's where new has none, scaled as AR's time in new is to AR's in old at
    the batch size nearest each that both timed (thread counts and load change every choice alike,
    as in AutoPolicy.build_scale). Both must time AR."""
    merged = {name: dict(by_size) for name, by_size in new.items()}
    for name, by_size in old.items():
        for size, seconds in by_size.items():
            if size not in merged.setdefault(name, {}):
                merged[name][size] = seconds * _ar_scale(new, old, int(size))
    return merged


def _ar_scale(new: dict, old: dict, size: int) -> float:
    both = set(new["ar"]) & set(old["ar"])
    near = _nearest(both or set(new["ar"]), size)
    return new["ar"][near] / old["ar"][_nearest(set(old["ar"]), int(near))]


def _nearest(sizes: set[str], size: int) -> str:
    return min(sizes, key=lambda s: (abs(int(s) - size), int(s)))
