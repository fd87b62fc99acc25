"""The engine model's Triton custom metrics, per mode, on the server's Prometheus endpoint.

    trimode_requests_total{mode}                 requests the engine accepted
    trimode_requests_finished_total{mode,reason} eos, length, abort (cancelled or disconnected), error
    trimode_requests_rejected_total{reason}      invalid, overloaded
    trimode_generated_tokens_total{mode}
    trimode_forward_passes_total{mode}           per request: a batched pass counts once per request in it
    trimode_accepted_tokens_total{mode}          self-spec: tokens accepted, summed over cycles
    trimode_speculation_cycles_total{mode}       self-spec: draft + verify cycles
    trimode_batch_occupancy{mode}                sequences holding a slot at the last step (mode="all": the pool)
    trimode_batch_occupancy_max{mode}            the most at any step since the server started

Counters are updated when a request finishes (its statistics are final then); occupancy every step,
but a gauge is set only when its value changes: each set is a round trip from the python backend
stub to the server, and four of them per step cost a few percent of an AR step at concurrency 1.
"""

from __future__ import annotations

from collections import Counter

from trimode.passes import Mode

_COUNTERS = {
    "trimode_requests_total": "Requests the engine accepted",
    "trimode_requests_finished_total": "Requests finished, by reason (eos, length, abort, error)",
    "trimode_requests_rejected_total": "Requests refused before they reached the engine (invalid, overloaded)",
    "trimode_generated_tokens_total": "Tokens generated",
    "trimode_forward_passes_total": "Forward passes, counted per request",
    "trimode_accepted_tokens_total": "Self-speculation: draft tokens accepted (sum over cycles)",
    "trimode_speculation_cycles_total": "Self-speculation: draft + verify cycles",
}
_GAUGES = {
    "trimode_batch_occupancy": "Sequences holding a KV slot at the last engine step",
    "trimode_batch_occupancy_max": "Most sequences holding a KV slot at any engine step",
}


class NullMetrics:
    """No metrics (the loop outside Triton)."""

    def admitted(self, seq) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def finished(self, seq) -> None: ...
    def step(self, running: list) -> None: ...


class TritonMetrics(NullMetrics):
    def __init__(self, model_name: str):
        import triton_python_backend_utils as pb_utils

        kinds = pb_utils.MetricFamily
        self._families = {name: kinds(name=name, description=d, kind=kinds.COUNTER) for name, d in _COUNTERS.items()}
        self._families |= {name: kinds(name=name, description=d, kind=kinds.GAUGE) for name, d in _GAUGES.items()}
        self._model = model_name
        self._metrics: dict[tuple, object] = {}
        self._max: Counter = Counter()
        self._occupancy: dict[str, int] = {}  # the value each occupancy gauge was last set to
        self.step([])  # every occupancy gauge present (0) before the first request

    def _get(self, family: str, **labels):
        key = (family, *sorted(labels.items()))
        if key not in self._metrics:
            self._metrics[key] = self._families[family].Metric(labels={"model": self._model, **labels})
        return self._metrics[key]

    def admitted(self, seq) -> None:
        self._get("trimode_requests_total", mode=seq.decoding.mode.value).increment(1)

    def rejected(self, reason: str) -> None:
        self._get("trimode_requests_rejected_total", reason=reason).increment(1)

    def finished(self, seq) -> None:
        mode, stats = seq.decoding.mode.value, seq.stats
        self._get("trimode_requests_finished_total", mode=mode, reason=seq.finish_reason or "abort").increment(1)
        self._get("trimode_generated_tokens_total", mode=mode).increment(stats.num_generated)
        self._get("trimode_forward_passes_total", mode=mode).increment(stats.num_passes)
        if stats.accepted_lengths:
            self._get("trimode_accepted_tokens_total", mode=mode).increment(sum(stats.accepted_lengths))
            self._get("trimode_speculation_cycles_total", mode=mode).increment(len(stats.accepted_lengths))

    def step(self, running: list) -> None:
        counts = Counter(seq.decoding.mode.value for seq in running)
        counts["all"] = len(running)
        for key in ("all", *(m.value for m in Mode)):
            if self._occupancy.get(key) != counts[key]:
                self._occupancy[key] = counts[key]
                self._get("trimode_batch_occupancy", mode=key).set(counts[key])
            if counts[key] > self._max[key]:
                self._max[key] = counts[key]
                self._get("trimode_batch_occupancy_max", mode=key).set(counts[key])
