"""The engine model's in-flight batching: one thread drives one Engine (design.md, Serving).

Triton's execute() hands each request to `submit` and returns at once (the model is decoupled);
the loop thread, the only one that touches the Engine, adds the new requests at the next step
boundary, runs one step, and sends each request the tokens that step committed (streaming) or its
whole text when it finishes. A streamed request whose last response has not left yet (its sink
sends from a thread) gets the step's tokens in its next response instead: at most one response
in flight per request, so a client pipeline slower than the engine gets fewer, larger responses.
A finished, cancelled or disconnected request leaves the Engine at once, which frees its KV slot,
and the loop drops its reference to the finished Sequence.
A request is cancelled when its sink says so (a client calling the engine model directly) or when
`cancel(handle)` names it (the ensemble's postprocessing step, which is how a cancel reaches the
engine through an ensemble in Triton 2.51: engine_model.py). A job's handle, which its responses
carry as sequence_id, is 63 random bits, not the engine's sequential id: only whoever received a
request's responses can name it, so no client can cancel another's request by counting.
Requests waiting for a slot are bounded: past the pool's free slots + `max_queued` (as of the last
step boundary), submit refuses with "overloaded", so a burst at an idle server fills the pool first.
Draining (SIGTERM of `trimode serve`): once `drain_file` exists, submit refuses every new request
with Unavailable while the accepted ones run to their end; then the loop writes `<drain_file>.done`,
which tells the server that stopping now cuts nothing.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from trimode.decoding.engine import Engine
from trimode.decoding.sequence import Sequence
from trimode.errors import TrimodeError
from trimode.triton_repo.request import Request
from trimode.triton_repo.response import pack
from trimode.triton_repo.text import window

# How often the loop asks the response senders whether their clients cancelled: each ask is a round
# trip from the python backend stub to the server, which every step would pay (~10% of an AR step).
SENDER_POLL_S = 0.05


class Overloaded(TrimodeError):
    """More requests wait for a slot than the engine model queues."""


class Unavailable(TrimodeError):
    """The server is draining: it takes no new request (Triton's UNAVAILABLE: retry elsewhere)."""


class Sink(Protocol):
    """Where one request's responses go (a Triton response sender, or a test's list)."""

    def send(self, outputs: dict[str, np.ndarray], final: bool) -> None: ...
    def fail(self, message: str) -> None: ...
    def close(self) -> None: ...  # the final flag alone (after a cancel)
    def is_cancelled(self) -> bool: ...
    def is_busy(self) -> bool: ...  # a response sent earlier has not left yet (a sink that sends from a thread)


class Outbox:
    """Sends the responses in the order given: from a thread of its own (threaded), or at once on the
    caller's. Each send is a round trip to tritonserver, which the loop thread would otherwise wait
    out between passes; threaded, the loop runs its next pass meanwhile (a pass lets go of the GIL:
    builder/aoti_loader.py), and a streamed row whose last response has not left yet gets its new
    tokens in the next one (EngineLoop._deliver), so the sends never queue up behind the engine.
    Measured on a 2-core AMD EPYC (2026-12-07): served AR spent 76-78% of its time in passes with it,
    60-67% without."""

    def __init__(self, threaded: bool):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._num_pending, self._lock = 0, threading.Lock()
        self._thread = threading.Thread(target=self._run, name="trimode-outbox", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def put(self, send, at_once: bool = False) -> None:
        """send(): one call of a response sender (it runs on the outbox's thread, if any). at_once: on
        the caller's thread, now, ahead of what is queued (the caller knows it overtakes nothing of
        its own request): a request's first token does not wait for the queue or for this thread
        to get the GIL (~1.5 ms later to the client at c=1, measured)."""
        with self._lock:
            self._num_pending += 1
        if self._thread is not None and not at_once:
            return self._queue.put(send)
        self._call(send)
        with self._lock:
            self._num_pending -= 1

    @property
    def is_threaded(self) -> bool:
        return self._thread is not None

    def is_empty(self) -> bool:
        """Whether everything put has been sent (EngineLoop's is_sent: a drain waits for it)."""
        with self._lock:
            return self._num_pending == 0

    def stop(self) -> None:
        """After what was put so far is sent (a send that hangs, to a tritonserver gone, is left)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while (send := self._queue.get()) is not None:
            self._call(send)
            with self._lock:
                self._num_pending -= 1

    @staticmethod
    def _call(send) -> None:
        try:
            send()  # the senders answer their own failures (engine_model.py Responses)
        except Exception:  # noqa: BLE001 (one bad send must not stop the others)
            pass


@dataclass(eq=False)
class Job:
    request: Request
    sink: Sink
    seq: Sequence | None = None
    num_sent: int = 0  # tokens already sent (streaming)
    handle: int = 0  # what its responses call sequence_id and cancel() names (module doc)
    arrived: float = field(default_factory=time.monotonic)  # for the latency histograms (metrics.py)
    scheduled: float | None = None  # when it first held a KV slot
    first_token: float | None = None

    @property
    def admitted_seq(self) -> Sequence:
        """seq, which the loop sets when it admits the job: every job of EngineLoop._live has one."""
        assert self.seq is not None
        return self.seq


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        max_queued: int,
        metrics=None,
        drain_file: Path | None = None,
        is_sent: Callable[[], bool] = lambda: True,
    ):
        """is_sent(): whether every response handed to a sink has left (a sink that sends from a thread
        of its own); a drain is done only then."""
        from trimode.triton_repo.metrics import NullMetrics

        self.engine, self.max_queued, self.metrics = engine, max_queued, metrics or NullMetrics()
        self.drain_file, self.is_sent = drain_file, is_sent
        self.is_draining = False  # set once, by the loop thread, when drain_file appears
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._live: dict[int, Job] = {}  # seq id -> job, while its Sequence is in the Engine
        self._by_handle: dict[int, int] = {}  # job handle -> seq id, for the same jobs
        self._lock = threading.Lock()
        self._num_waiting = 0  # submitted, not yet holding a slot (read by submit)
        self._num_free = engine.runner.num_free  # free slots at the last step boundary (read by submit)
        self._cancel_handles: set[int] = set()  # handles cancel() named (under _lock)
        self._stopping = threading.Event()
        self._last_poll = self._last_drain_check = 0.0
        self._thread = threading.Thread(target=self._run, name="trimode-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:  # with _check_drain's: no job slips in after the drain is declared done
            if self.is_draining:
                raise Unavailable("unavailable: the server is draining (shutting down); retry on another replica")
            if self._num_waiting >= self._num_free + self.max_queued:
                raise Overloaded(
                    f"overloaded: {self._num_waiting} requests already wait for one of the "
                    f"{self.engine.config.max_slots} slots; retry later"
                )
            self._num_waiting += 1
            self._inbox.put(job)

    def cancel(self, handle: int) -> None:
        """Abort that request at the next step boundary (any thread; an unknown or finished handle is ignored)."""
        with self._lock:
            self._cancel_handles.add(handle)

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join()
        for job in self._live.values():
            job.sink.fail("the server is shutting down")
        self._live.clear()
        self._by_handle.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._check_drain()
            self._take(block=not self.engine.has_work)
            self._drop_cancelled()
            if self.engine.has_work:
                self._step()
                if not self.engine.has_work:
                    # idle: the gauges read 0, not the last batch
                    self.metrics.step([], kv=self.engine.kv_usage(), clock=self.engine.runner.clock)
            with self._lock:
                self._num_waiting = len(self.engine.waiting) + self._inbox.qsize()
                self._num_free = self.engine.runner.num_free

    def _check_drain(self) -> None:
        """Notice the drain file (a stat per poll interval), and say when nothing is left in flight."""
        if self.drain_file is None or time.monotonic() - self._last_drain_check < SENDER_POLL_S:
            return
        self._last_drain_check = time.monotonic()
        with self._lock:
            self.is_draining = self.is_draining or self.drain_file.exists()
            idle = self.is_draining and not self._live and self._inbox.empty() and not self.engine.has_work
            idle = idle and self.is_sent()
        done = self.drain_file.with_name(self.drain_file.name + ".done")
        if idle and not done.exists():
            done.write_text("drained\n")

    def _take(self, block: bool) -> None:
        """New requests join here, between steps."""
        while True:
            try:
                job = self._inbox.get(block=block, timeout=0.05 if block else None)
            except queue.Empty:
                return
            block = False
            if job is None:
                return
            try:
                job.seq = self.engine.add(job.request.prompt, job.request.sampling, job.request.decoding)
            except TrimodeError as e:
                self.metrics.rejected("invalid")
                job.sink.fail(str(e).replace("max_new_tokens", "max_tokens"))  # the input's name here
                continue
            job.handle = secrets.randbits(63)
            self._live[job.seq.id] = job
            self._by_handle[job.handle] = job.seq.id
            self.metrics.admitted(job.seq)

    def _drop_cancelled(self) -> None:
        poll = time.monotonic() - self._last_poll >= SENDER_POLL_S
        if not poll and not self._cancel_handles:  # most steps: read without the lock, as cancel() only adds
            return
        if poll:
            self._last_poll = time.monotonic()
        with self._lock:
            handles, self._cancel_handles = self._cancel_handles, set()
        named = {self._by_handle[h] for h in handles if h in self._by_handle}
        dropped = False
        for seq_id, job in list(self._live.items()):
            if seq_id in named or poll and job.sink.is_cancelled():
                job.admitted_seq.finish_reason = "abort"
                self._abort(job)
                job.sink.close()
                dropped = True
        if dropped and not self.engine.has_work:
            self.metrics.step([], kv=self.engine.kv_usage(), clock=self.engine.runner.clock)  # freed slots now

    def _abort(self, job: Job) -> None:
        self.engine.abort(job.admitted_seq.id)  # frees the slot now
        self._forget(job)

    def _forget(self, job: Job) -> None:
        seq = job.admitted_seq
        del self._live[seq.id]
        del self._by_handle[job.handle]
        gap = None
        if job.first_token is not None and len(seq.tokens) > 1:
            gap = (time.monotonic() - job.first_token) / (len(seq.tokens) - 1)
        self.metrics.finished(seq, gap)

    def _timestamp(self, job: Job, now: float) -> None:
        """The first step a job holds a slot, and the first that gives it a token (metrics.py histograms)."""
        seq = job.admitted_seq
        if job.scheduled is None and (seq.slot is not None or seq.tokens):
            job.scheduled = now
            self.metrics.scheduled(seq, now - job.arrived)
        if job.first_token is None and seq.tokens:
            job.first_token = now
            self.metrics.first_token(seq, now - job.arrived)

    def _step(self) -> None:
        try:
            new = self.engine.step()
        except Exception as e:  # a failed step fails the requests in it, never the loop
            message = str(e) if isinstance(e, TrimodeError) else f"internal error: {type(e).__name__}: {e}"
            for job in list(self._live.values()):
                job.admitted_seq.finish_reason = "error"
                self._abort(job)
                job.sink.fail(message)
            return
        # the step's batch: what still holds a slot, and what finished in it
        seqs = [job.admitted_seq for job in self._live.values()]
        running = [seq for seq in seqs if seq.slot is not None or seq.id in new]
        self.metrics.step(running, len(self.engine.waiting), self.engine.kv_usage(), self.engine.runner.clock)
        now = time.monotonic()
        for job in sorted(self._live.values(), key=lambda job: job.num_sent > 0):  # first tokens first
            if job.first_token is None:
                self._timestamp(job, now)
            if job.admitted_seq.id in new or job.admitted_seq.finish_reason:
                self._deliver(job)

    def _deliver(self, job: Job) -> None:
        seq = job.admitted_seq
        final = seq.finish_reason is not None
        if not final and not (job.request.is_stream and len(seq.tokens) > job.num_sent):
            return
        if not final and job.sink.is_busy():  # one response in flight a row: the next one takes these tokens too
            return
        if job.request.is_stream:
            ids, prefix_length = window(seq.tokens, job.num_sent, len(seq.tokens))
            new = slice(job.num_sent, len(seq.tokens))
        else:  # one response: all tokens (after the prompt's, as TensorRT-LLM does unless excluded)
            ids, prefix_length = (seq.prompt + seq.tokens if job.request.prepend_prompt else seq.tokens), 0
            new = slice(0, len(seq.tokens))
        try:
            job.sink.send(pack(seq, ids, prefix_length, final, job.handle, job.request.batch_index, new), final)
        except Exception:  # the client is gone: stop generating for it
            if not final:
                seq.finish_reason = "abort"
                self._abort(job)
                return
        job.num_sent = len(seq.tokens)
        if final:
            self._forget(job)
