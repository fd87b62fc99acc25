"""The engine model's Triton custom metrics, per mode, on the server's Prometheus endpoint.

    trimode_requests_total{mode}                 prompts the engine accepted
    trimode_requests_finished_total{mode,reason} eos, length, abort (cancelled or disconnected), error
    trimode_requests_rejected_total{reason}      invalid, overloaded, draining
    trimode_preprocessing_rejected_total         (each preprocessing_<mode> model) refused before the engine
    trimode_generated_tokens_total{mode}
    trimode_forward_passes_total{mode}           per request: a batched pass counts once per request in it
    trimode_accepted_tokens_total{mode}          self-spec: drafted tokens accepted and emitted
    trimode_speculation_cycles_total{mode}       self-spec: draft + verify cycles
    trimode_auto_cycles_total{ran}               auto: the cycles it ran of each choice (ar, self-spec/8, quadratic/4, ..)
    trimode_batch_occupancy{mode}                sequences holding a slot at the last step (mode="all": the pool)
    trimode_batch_occupancy_max{mode}            the most at any step since the server started
    trimode_kv_slots                             the engine's slots: sequences that can hold KV at once
    trimode_kv_blocks, trimode_kv_block_size     the KV pool: blocks of block_size positions, and its bytes
    trimode_kv_cache_bytes
    trimode_kv_blocks_used                       blocks held by sequences at the last step (/ kv_blocks: usage)
    trimode_preemptions_total                    sequences whose blocks were taken back (they resume later)
    trimode_prefix_cache_queried_tokens_total    prefill tokens looked up in the prefix cache
    trimode_prefix_cache_hit_tokens_total        of those, found: hit rate = hit / queried
    trimode_pass_seconds_total                   time inside forward passes (runner.PassClock), added when
                                                 the engine goes idle and at most a second apart while busy:
                                                 its rate is the share of time spent in passes
    trimode_requests_waiting                     prompts accepted and waiting for a slot, at the last step
    trimode_queue_time_seconds{mode}             histogram: arrival to a KV slot, one observation a request
    trimode_time_to_first_token_seconds{mode}    histogram: arrival to the first token
    trimode_inter_token_latency_seconds{mode}    histogram: a request's mean gap between tokens after its
                                                 first (one observation a request of >= 2 tokens)

Invariants (tests/test_metrics_invariants.py): every request is counted once, by the model that
ends it: preprocessing_rejected_total, or, per prompt, requests_total or requests_rejected_total; each one counted in requests_total finishes
once, so the finished counts add up to it when the server is idle; accepted tokens <= generated
tokens; each histogram's count equals the requests that reached its point. A request Triton itself
refuses (an unknown gRPC input, a wrong type) reaches no model of ours: Triton's own
nv_inference_request_failure counts it.

Counters are updated when a request finishes (its statistics are final then), histograms once a
request; occupancy every step, but a gauge is set only when its value changes: each set is a round
trip from the python backend stub to the server, and four of them per step cost a few percent of
an AR step at concurrency 1.
"""

from __future__ import annotations

import time
from collections import Counter

from trimode.passes import Mode

_COUNTERS = {
    "trimode_requests_total": "Requests the engine accepted",
    "trimode_requests_finished_total": "Requests finished, by reason (eos, length, abort, error)",
    "trimode_requests_rejected_total": "Requests refused before they reached the engine (invalid, overloaded)",
    "trimode_generated_tokens_total": "Tokens generated",
    "trimode_forward_passes_total": "Forward passes, counted per request",
    "trimode_accepted_tokens_total": "Self-speculation: drafted tokens accepted and emitted",
    "trimode_speculation_cycles_total": "Self-speculation: draft + verify cycles",
    "trimode_auto_cycles_total": "auto: cycles run of each choice (mode/block length)",
    "trimode_preemptions_total": "Sequences preempted when the KV pool ran out of blocks",
    "trimode_prefix_cache_queried_tokens_total": "Prefill tokens looked up in the prefix cache",
    "trimode_prefix_cache_hit_tokens_total": "Prefill tokens found in the prefix cache (not computed)",
    "trimode_pass_seconds_total": "Seconds the engine spent inside forward passes",
}
PASS_SECONDS_EVERY_S = 1.0  # how often a busy engine reports its pass time (on CUDA a read is a sync)
_KV_COUNTERS = (  # KVUsage's counter fields (decoding/engine.py), in order after blocks_used
    "trimode_preemptions_total",
    "trimode_prefix_cache_queried_tokens_total",
    "trimode_prefix_cache_hit_tokens_total",
)
_GAUGES = {
    "trimode_batch_occupancy": "Sequences holding a KV slot at the last engine step",
    "trimode_batch_occupancy_max": "Most sequences holding a KV slot at any engine step",
    "trimode_kv_slots": "Slots of the engine: sequences that can hold KV at once",
    "trimode_kv_blocks": "Blocks of the KV pool",
    "trimode_kv_block_size": "Positions per KV block",
    "trimode_kv_cache_bytes": "Bytes of the KV pool",
    "trimode_kv_blocks_used": "KV blocks held by sequences at the last engine step",
    "trimode_requests_waiting": "Prompts accepted and waiting for a KV slot at the last engine step",
}
_HISTOGRAMS = {
    "trimode_queue_time_seconds": "Arrival to a KV slot",
    "trimode_time_to_first_token_seconds": "Arrival to the first token",
    "trimode_inter_token_latency_seconds": "Mean gap between a request's tokens after its first",
}
# seconds: 1 ms .. 60 s, about 2x apart (CPU tiny models at the low end, 8B on a loaded GPU at the top)
BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


def accepted_tokens(stats) -> int:
    """Drafted tokens that were accepted and emitted. The cycles emitted every generated token but the
    prefill's first, and only the last cycle can be cut (by EOS or max_tokens) below what it accepted."""
    return min(sum(stats.accepted_lengths), max(stats.num_generated - 1, 0))


class NullMetrics:
    """No metrics (the loop outside Triton)."""

    def admitted(self, seq) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def scheduled(self, seq, queue_time_s: float) -> None: ...
    def first_token(self, seq, ttft_s: float) -> None: ...
    def finished(self, seq, inter_token_s: float | None = None) -> None: ...
    def step(self, running: list, num_waiting: int = 0, kv=None, clock=None) -> None: ...


class TritonMetrics(NullMetrics):
    def __init__(self, model_name: str, num_slots: int = 0, pool=None):
        """pool: the engine's KVCache (its blocks, block size and bytes are reported once)."""
        import triton_python_backend_utils as pb_utils

        kinds = pb_utils.MetricFamily
        self._families = {name: kinds(name=name, description=d, kind=kinds.COUNTER) for name, d in _COUNTERS.items()}
        self._families |= {name: kinds(name=name, description=d, kind=kinds.GAUGE) for name, d in _GAUGES.items()}
        self._families |= {
            name: kinds(name=name, description=d, kind=kinds.HISTOGRAM) for name, d in _HISTOGRAMS.items()
        }
        self._model = model_name
        self._metrics: dict[tuple, object] = {}
        self._max: Counter = Counter()
        self._occupancy: dict[str, int] = {}  # the value each occupancy gauge was last set to
        self._num_waiting = -1
        self._batch: list[int] | None = None  # the sequence ids of the last step's batch
        self._kv = (-1, 0, 0, 0)  # the KVUsage last reported
        self._pass_seconds, self._pass_seconds_at = 0.0, time.monotonic()
        self.step([], kv=(0, 0, 0, 0))  # every occupancy gauge present (0) before the first request
        self._get("trimode_kv_slots").set(num_slots)
        if pool is not None:
            self._get("trimode_kv_blocks").set(pool.num_blocks)
            self._get("trimode_kv_block_size").set(pool.block_size)
            self._get("trimode_kv_cache_bytes").set(pool.num_bytes)

    def _get(self, family: str, **labels):
        key = (family, *sorted(labels.items()))
        if key not in self._metrics:
            extra = {"buckets": BUCKETS} if family in _HISTOGRAMS else {}
            self._metrics[key] = self._families[family].Metric(labels={"model": self._model, **labels}, **extra)
        return self._metrics[key]

    def close(self) -> None:
        """Release the metrics while the stub still has its shared memory: a Metric or MetricFamily
        destroyed at the stub's exit segfaulted it (python backend 2.51, Metric::SaveToSharedMemory
        at a null pool, seen in dmesg on every stop)."""
        self._metrics.clear()
        self._families.clear()

    def scheduled(self, seq, queue_time_s: float) -> None:
        self._get("trimode_queue_time_seconds", mode=seq.decoding.mode.value).observe(queue_time_s)

    def first_token(self, seq, ttft_s: float) -> None:
        self._get("trimode_time_to_first_token_seconds", mode=seq.decoding.mode.value).observe(ttft_s)

    def admitted(self, seq) -> None:
        self._get("trimode_requests_total", mode=seq.decoding.mode.value).increment(1)

    def rejected(self, reason: str) -> None:
        self._get("trimode_requests_rejected_total", reason=reason).increment(1)

    def finished(self, seq, inter_token_s: float | None = None) -> None:
        mode, stats = seq.decoding.mode.value, seq.stats
        if inter_token_s is not None:
            self._get("trimode_inter_token_latency_seconds", mode=mode).observe(inter_token_s)
        self._get("trimode_requests_finished_total", mode=mode, reason=seq.finish_reason or "abort").increment(1)
        self._get("trimode_generated_tokens_total", mode=mode).increment(stats.num_generated)
        self._get("trimode_forward_passes_total", mode=mode).increment(stats.num_passes)
        if stats.accepted_lengths:
            self._get("trimode_accepted_tokens_total", mode=mode).increment(accepted_tokens(stats))
            self._get("trimode_speculation_cycles_total", mode=mode).increment(len(stats.accepted_lengths))
        for ran, cycles in stats.auto_cycles.items():
            self._get("trimode_auto_cycles_total", ran=ran).increment(cycles)

    def step(self, running: list, num_waiting: int = 0, kv=None, clock=None) -> None:
        """kv: the engine's KVUsage now (None: unchanged); clock: its runner's PassClock."""
        now = time.monotonic()
        if clock is not None and (not running or now - self._pass_seconds_at >= PASS_SECONDS_EVERY_S):
            seconds, self._pass_seconds_at = clock.seconds, now
            if seconds > self._pass_seconds:
                self._get("trimode_pass_seconds_total").increment(seconds - self._pass_seconds)
                self._pass_seconds = seconds
        if kv is not None and tuple(kv) != self._kv:
            if kv[0] != self._kv[0]:
                self._get("trimode_kv_blocks_used").set(kv[0])
            for name, now, before in zip(_KV_COUNTERS, kv[1:], self._kv[1:]):
                if now > before:
                    self._get(name).increment(now - before)
            self._kv = tuple(kv)
        if num_waiting != self._num_waiting:
            self._num_waiting = num_waiting
            self._get("trimode_requests_waiting").set(num_waiting)
        batch = [seq.id for seq in running]
        if batch == self._batch:  # the same sequences as last step: the same occupancy (most steps)
            return
        self._batch = batch
        counts = Counter(seq.decoding.mode.value for seq in running)
        counts["all"] = len(running)
        for key in ("all", *(m.value for m in Mode)):
            if self._occupancy.get(key) != counts[key]:
                self._occupancy[key] = counts[key]
                self._get("trimode_batch_occupancy", mode=key).set(counts[key])
            if counts[key] > self._max[key]:
                self._max[key] = counts[key]
                self._get("trimode_batch_occupancy_max", mode=key).set(counts[key])
