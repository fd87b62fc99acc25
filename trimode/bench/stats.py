"""The numbers of a bench run: percentiles, one level's summary, speed-ups over AR, and the advice.

Pure functions over plain values (no torch, no server), so they are unit-tested on their own. The
benchmark scripts take their medians from `percentile` too: one helper per chore.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between the two nearest ranks
    (numpy's default): percentile(v, 50) is the median, 0 the minimum, 100 the maximum."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must lie in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Record:
    """One finished request, times in seconds from the start of its level."""

    start_s: float
    first_token_s: float  # when the first output token arrived
    end_s: float
    num_tokens: int
    num_passes: int | None  # forward passes that served it (None: the target does not say)
    mean_accepted_length: float | None  # self-spec: mean accepted tokens per cycle (None elsewhere)


def summarize(rounds: list[tuple[list[Record], float, float | None]]) -> dict:
    """One (variant, concurrency) cell from its rounds (records, wall time from first send to last
    answer, the engine's seconds inside forward passes meanwhile or None). A round's tokens/s = its
    output tokens / its wall time; the cell's is the median round's (the rounds ran interleaved with
    the other variants', so their spread is the machine's noise). Everything else pools the rounds'
    requests; tokens per pass counts every pass, prefill included. pass_efficiency: the share of the
    wall time the engine spent inside passes (the rest is host work: scheduling, sampling, transfers,
    serving), None when the target does not say."""
    records = [r for rs, _, _ in rounds for r in rs]
    per_round = [sum(r.num_tokens for r in rs) / wall_s for rs, wall_s, _ in rounds]
    tokens = sum(r.num_tokens for r in records)
    wall_s = sum(w for _, w, _ in rounds)
    in_passes = [p for _, _, p in rounds if p is not None]
    passes = [r.num_passes for r in records]
    counted = [p for p in passes if p is not None]
    num_passes = sum(counted) if len(counted) == len(passes) else 0  # 0: unknown for some request
    ttft = [r.first_token_s - r.start_s for r in records]
    latency = [r.end_s - r.start_s for r in records]
    return {
        "num_requests": len(records),
        "num_output_tokens": tokens,
        "wall_s": round(wall_s, 6),
        "tokens_per_s": round(percentile(per_round, 50), 2),
        "tokens_per_s_rounds": [round(t, 2) for t in per_round],
        "requests_per_s": round(len(records) / wall_s, 3),
        "tokens_per_pass": round(tokens / num_passes, 4) if num_passes else None,
        "pass_efficiency": round(sum(in_passes) / wall_s, 4) if len(in_passes) == len(rounds) else None,
        "mean_accepted_length": mean_accepted_length(records),
        "ttft_s": {"p50": round(percentile(ttft, 50), 5), "p95": round(percentile(ttft, 95), 5)},
        "latency_s": {"p50": round(percentile(latency, 50), 5), "p95": round(percentile(latency, 95), 5)},
    }


def mean_accepted_length(records: list[Record]) -> float | None:
    """Accepted tokens per self-spec cycle over all cycles of all requests (as `trimode eval` counts
    it), from each request's mean: its cycles are taken as its tokens after the first (the prefill's)
    over that mean, exact but for a last cycle that max_tokens cut short. The plain mean of the
    requests' means would weigh a request of 9 long cycles like one of 39 short ones."""
    spec = [(r.num_tokens, mean) for r in records if (mean := r.mean_accepted_length)]
    cycles = sum((num_tokens - 1) / mean for num_tokens, mean in spec)
    if not cycles:
        return round(sum(mean for _, mean in spec) / len(spec), 4) if spec else None
    return round(sum(num_tokens - 1 for num_tokens, _ in spec) / cycles, 4)


def add_speedups(rows: list[dict]) -> None:
    """rows[i]["speedup_vs_ar"] = its tokens/s over AR's at the same concurrency (same run); None
    where AR was not measured at that level."""
    ar = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["mode"] == "ar"}
    for r in rows:
        base = ar.get(r["concurrency"])
        r["speedup_vs_ar"] = round(r["tokens_per_s"] / base, 3) if base else None


LOSSLESS = ("ar", "self-spec", "quadratic")  # the fixed modes auto chooses among (AR's tokens at T = 0)


def advise(rows: list[dict]) -> list[dict]:
    """Per concurrency measured: the fastest variant by output tokens/s, its ratio over AR, the
    runner-up (how clear the choice is), and auto's tokens/s over the best lossless fixed mode's."""
    advice = []
    for c in sorted({r["concurrency"] for r in rows}):
        ranked = sorted((r for r in rows if r["concurrency"] == c), key=lambda r: r["tokens_per_s"], reverse=True)
        best, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        entry = {
            "concurrency": c,
            "variant": best["variant"],
            "mode": best["mode"],
            "block_length": best["block_length"],
            "tokens_per_s": best["tokens_per_s"],
            "speedup_vs_ar": best["speedup_vs_ar"],
            "too_close": too_close(best, second),
            "runner_up": second
            and {
                "variant": second["variant"],
                "tokens_per_s": second["tokens_per_s"],
                "speedup_vs_ar": second["speedup_vs_ar"],
            },
        }
        auto = next((r["tokens_per_s"] for r in ranked if r["mode"] == "auto"), None)
        fixed = [r["tokens_per_s"] for r in ranked if r["mode"] in LOSSLESS]
        entry["auto_vs_best_fixed"] = round(auto / max(fixed), 3) if auto and fixed else None
        entry["text"] = advice_text(entry)
        advice.append(entry)
    return advice


def too_close(best: dict, second: dict | None) -> bool | None:
    """Whether the two overlap over their rounds (the slowest round of the best is no faster than
    the fastest of the runner-up); None with one round each, which says nothing about the noise."""
    if second is None or min(len(best["tokens_per_s_rounds"]), len(second["tokens_per_s_rounds"])) < 2:
        return None
    return min(best["tokens_per_s_rounds"]) <= max(second["tokens_per_s_rounds"])


def advice_text(a: dict) -> str:
    block = f" at block length {a['block_length']}" if a["block_length"] and a["mode"] != "ar" else ""
    ratio = f", {a['speedup_vs_ar']:.2f}x AR" if a["speedup_vs_ar"] is not None and a["mode"] != "ar" else ""
    text = f"concurrency {a['concurrency']}: run {a['mode']}{block} ({a['tokens_per_s']:.1f} tok/s{ratio})"
    second = a["runner_up"]
    if second:
        vs = f", {second['speedup_vs_ar']:.2f}x AR" if second["speedup_vs_ar"] is not None else ""
        text += f"; next {second['variant']} ({second['tokens_per_s']:.1f} tok/s{vs})"
    if a["too_close"]:
        text += ": too close to call, their rounds overlap"
    if a.get("auto_vs_best_fixed") is not None:
        text += f"; auto {a['auto_vs_best_fixed']:.2f}x the best of {', '.join(LOSSLESS)}"
    return text
