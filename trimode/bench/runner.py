"""The bench: per variant (a mode at a block length) and concurrency level, a closed loop of
requests on one target; the report holds every cell, the speed-ups over AR and the advice.

Closed loop at level c: c client threads, each sending its next request as soon as its previous
one finished, until the level's requests are used up (or its duration is over: requests already
sent finish and count; every client sends at least one). Request i of a level gets prompt
i mod len(prompts), the same for every variant. Levels run in order, every variant within a level
back to back (with several rounds, round-robin), so AR and the mode it is compared with share the
machine's load of that moment. Each variant gets its warm-up requests first (with the longest
prompt, so a prompt that cannot fit fails there, before any timing), and again before each of its
timed runs where other variants ran since: on CPU a mode's first passes after another mode's ran
up to 1.6x slower for a dozen cycles, so each variant paid for the one before it (in the order ar,
self-spec, quadratic, auto, auto ran 2% slower after quadratic than after AR, where AR followed auto).
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from trimode.bench.stats import Record, add_speedups, advise, summarize
from trimode.bench.targets import Ask, BenchError, Target
from trimode.errors import InputError
from trimode.passes import Mode

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class BenchSettings:
    modes: tuple[str, ...] = tuple(m.value for m in Mode)
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    num_requests: int | None = None  # per level; None: 2 per client, at least 8 (or duration_s)
    duration_s: float | None = None  # per level, instead of num_requests
    max_tokens: int = 64
    block_lengths: tuple[int, ...] = ()  # every mode but ar runs at every one; (): the default
    ignore_eos: bool = True
    num_warmup: int = 1
    num_rounds: int = 1  # of every cell, interleaved with the other variants'

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in {m.value for m in Mode}]
        if bad or not self.modes:
            raise InputError(
                f"modes: expected some of {', '.join(m.value for m in Mode)}, got {','.join(self.modes)!r}"
            )
        if not self.concurrency or min(self.concurrency) < 1:
            raise InputError(f"concurrency: expected integers >= 1, got {self.concurrency}")
        if self.num_requests is not None and self.duration_s is not None:
            raise InputError("num_requests and duration_s: pass one of them")
        if self.num_requests is not None and self.num_requests < max(self.concurrency):
            raise InputError(
                f"num_requests: {self.num_requests} is fewer than concurrency {max(self.concurrency)} "
                f"(every client sends at least one request)"
            )
        if self.duration_s is not None and not self.duration_s > 0:
            raise InputError(f"duration_s: expected a number of seconds > 0, got {self.duration_s}")
        if min(self.max_tokens, self.num_rounds, *self.block_lengths) < 1 or self.num_warmup < 0:
            raise InputError("max_tokens, num_rounds and block_lengths must be >= 1, num_warmup >= 0")

    def requests_at(self, concurrency: int) -> int | None:
        if self.duration_s is not None:
            return None
        return self.num_requests or max(8, 2 * concurrency)


@dataclass(frozen=True)
class Variant:
    mode: Mode
    block_length: int | None  # None: the target's default, which it did not tell

    @property
    def name(self) -> str:
        return (
            self.mode.value
            if self.block_length is None or self.mode is Mode.AR
            else f"{self.mode.value}/{self.block_length}"
        )


def variants(settings: BenchSettings, default_block_length: int | None) -> list[Variant]:
    """Each mode at each block length asked for (none asked: the target's default); AR has none, and
    auto is called as a client calls it, naming none: it chooses among the engine's."""
    out = []
    for mode in (Mode(m) for m in settings.modes):
        lengths = settings.block_lengths or (default_block_length,)
        out += [Variant(mode, None)] if mode in (Mode.AR, Mode.AUTO) else [Variant(mode, L) for L in lengths]
    return out


def timed(target: Target, ask: Ask, t0: float) -> Record:
    """Run one request; times from t0."""
    start, first, last = time.perf_counter(), None, None
    for update in target.stream(ask):
        if first is None and update.num_tokens > 0:
            first = time.perf_counter()
        last = update
    end = time.perf_counter()
    if last is None:
        raise BenchError(f"{ask.mode.value}: the target answered nothing")
    return Record(
        start - t0, (first or end) - t0, end - t0, last.num_tokens, last.num_passes, last.mean_accepted_length
    )


def closed_loop(
    target: Target, ask_for: Callable[[int], Ask], concurrency: int, num_requests: int | None, duration_s: float | None
) -> tuple[list[Record], float]:
    """-> the finished requests and the wall time from the first send to the last answer."""
    counter, lock = itertools.count(), threading.Lock()
    records: list[Record] = []
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def client() -> None:
        while not errors:
            with lock:
                i = next(counter)
            if (num_requests is not None and i >= num_requests) or (
                duration_s is not None and i >= concurrency and time.perf_counter() - t0 >= duration_s
            ):
                return
            try:
                record = timed(target, ask_for(i), t0)
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                errors.append(e)
                return
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return records, max(r.end_s for r in records)


def run_bench(
    target: Target,
    prompts: list[str],
    settings: BenchSettings,
    on_start: Callable[[int], None] | None = None,
    on_cell: Callable[[str, int], None] | None = None,
) -> dict:
    """The report (module doc). on_start(number of runs) after the warm-ups; on_cell(variant, c) after each run."""
    target.check([Mode(m) for m in settings.modes])
    runs = variants(settings, target.default_block_length)
    longest = max(prompts, key=len)

    def warm_up(v: Variant) -> None:
        for _ in range(settings.num_warmup):
            timed(target, Ask(longest, v.mode, v.block_length, settings.max_tokens, settings.ignore_eos), 0.0)

    for v in runs:
        warm_up(v)
    if on_start:
        on_start(len(runs) * len(settings.concurrency) * settings.num_rounds)
    rows = []
    for c in settings.concurrency:
        rounds: dict[Variant, list] = {v: [] for v in runs}  # (records, wall s, s inside passes | None) a round
        for _ in range(settings.num_rounds):
            for v in runs:

                def ask_for(i: int, v=v) -> Ask:
                    return Ask(
                        prompts[i % len(prompts)], v.mode, v.block_length, settings.max_tokens, settings.ignore_eos
                    )

                if len(runs) > 1:
                    warm_up(v)  # the other variants ran since (module doc)
                before = target.pass_seconds()
                records, wall_s = closed_loop(target, ask_for, c, settings.requests_at(c), settings.duration_s)
                after = target.pass_seconds()
                in_passes = None if before is None or after is None else after - before
                rounds[v].append((records, wall_s, in_passes))
                if on_cell:
                    on_cell(v.name, c)
        rows += [
            {
                "variant": v.name,
                "mode": v.mode.value,
                "block_length": v.block_length,
                "concurrency": c,
                **summarize(rounds[v]),
            }
            for v in runs
        ]
    add_speedups(rows)
    return {
        "tool": _tool(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "target": target.describe(),
        "settings": {
            **asdict(settings),
            "temperature": 0.0,
            "requests_per_level": {c: settings.requests_at(c) for c in settings.concurrency},
            "num_prompts": len(prompts),
            "prompt_chars": [min(map(len, prompts)), max(map(len, prompts))],
        },
        "notes": notes(target, settings),
        "results": rows,
        "advice": advise(rows),
    }


def notes(target: Target, settings: BenchSettings) -> list[str]:
    out = []
    over = [c for c in settings.concurrency if target.slots and c > target.slots]
    if over:
        out.append(
            f"concurrency {', '.join(map(str, over))} exceeds the engine's {target.slots} slots: "
            f"the extra requests wait in the {'server' if target.kind != 'engine' else 'engine'}'s queue"
        )
    if target.slots is None:
        out.append("the target does not say how many requests it runs at once")
    if "ar" not in settings.modes:
        out.append("AR was not measured: no speed-ups over AR")
    return out


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "num_cpus": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _tool() -> str:
    from importlib.metadata import version

    return f"trimode {version('trimode')}"
