"""The engine model's in-flight batching: one thread drives one Engine (design.md, Serving).

Triton's execute() hands each request to `submit` and returns at once (the model is decoupled);
the loop thread, the only one that touches the Engine, adds the new requests at the next step
boundary, runs one step, and sends each request the tokens that step committed (streaming) or its
whole text when it finishes. A finished, cancelled or disconnected request leaves the Engine at
once, which frees its KV slot, and the loop drops its reference to the finished Sequence.
A request is cancelled when its sink says so (a client calling the engine model directly) or when
`cancel(seq_id)` names it (the ensemble's postprocessing step, which is how a cancel reaches the
engine through an ensemble in Triton 2.51: engine_model.py).
Requests waiting for a slot are bounded: past the pool's free slots + `max_queued` (as of the last
step boundary), submit refuses with "overloaded", so a burst at an idle server fills the pool first.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from trimode.decoding.engine import Engine
from trimode.decoding.sequence import Sequence
from trimode.errors import TrimodeError
from trimode.triton_repo.request import Request
from trimode.triton_repo.text import window

# How often the loop asks the response senders whether their clients cancelled: each ask is a round
# trip from the python backend stub to the server, which every step would pay (~10% of an AR step).
SENDER_POLL_S = 0.05


class Overloaded(TrimodeError):
    """More requests wait for a slot than the engine model queues."""


class Sink(Protocol):
    """Where one request's responses go (a Triton response sender, or a test's list)."""

    def send(self, outputs: dict[str, np.ndarray], final: bool) -> None: ...
    def fail(self, message: str) -> None: ...
    def close(self) -> None: ...  # the final flag alone (after a cancel)
    def is_cancelled(self) -> bool: ...


@dataclass(eq=False)
class Job:
    request: Request
    sink: Sink
    seq: Sequence | None = None
    num_sent: int = 0  # tokens already sent (streaming)

    @property
    def admitted_seq(self) -> Sequence:
        """seq, which the loop sets when it admits the job: every job of EngineLoop._live has one."""
        assert self.seq is not None
        return self.seq


class EngineLoop:
    def __init__(self, engine: Engine, max_queued: int, metrics=None):
        from trimode.triton_repo.metrics import NullMetrics

        self.engine, self.max_queued, self.metrics = engine, max_queued, metrics or NullMetrics()
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._live: dict[int, Job] = {}  # seq id -> job, while its Sequence is in the Engine
        self._lock = threading.Lock()
        self._num_waiting = 0  # submitted, not yet holding a slot (read by submit)
        self._num_free = engine.runner.num_free  # free slots at the last step boundary (read by submit)
        self._cancel_ids: set[int] = set()  # seq ids cancel() named (under _lock)
        self._stopping = threading.Event()
        self._last_poll = 0.0
        self._thread = threading.Thread(target=self._run, name="trimode-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._num_waiting >= self._num_free + self.max_queued:
                raise Overloaded(
                    f"overloaded: {self._num_waiting} requests already wait for one of the "
                    f"{self.engine.config.max_slots} slots; retry later"
                )
            self._num_waiting += 1
        self._inbox.put(job)

    def cancel(self, seq_id: int) -> None:
        """Abort that request at the next step boundary (any thread; an unknown or finished id is ignored)."""
        with self._lock:
            self._cancel_ids.add(seq_id)

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join()
        for job in self._live.values():
            job.sink.fail("the server is shutting down")
        self._live.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._take(block=not self.engine.has_work)
            self._drop_cancelled()
            if self.engine.has_work:
                self._step()
                if not self.engine.has_work:
                    self.metrics.step([])  # idle: the occupancy gauges read 0, not the last batch
            with self._lock:
                self._num_waiting = len(self.engine.waiting) + self._inbox.qsize()
                self._num_free = self.engine.runner.num_free

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
            self._live[job.seq.id] = job
            self.metrics.admitted(job.seq)

    def _drop_cancelled(self) -> None:
        with self._lock:
            named, self._cancel_ids = self._cancel_ids, set()
        poll = time.monotonic() - self._last_poll >= SENDER_POLL_S
        if poll:
            self._last_poll = time.monotonic()
        dropped = False
        for seq_id, job in list(self._live.items()):
            if seq_id in named or poll and job.sink.is_cancelled():
                job.admitted_seq.finish_reason = "abort"
                self._abort(job)
                job.sink.close()
                dropped = True
        if dropped and not self.engine.has_work:
            self.metrics.step([])  # the gauges read the freed slots now, not at the next step

    def _abort(self, job: Job) -> None:
        self.engine.abort(job.admitted_seq.id)  # frees the slot now
        del self._live[job.admitted_seq.id]
        self.metrics.finished(job.admitted_seq)

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
        self.metrics.step([seq for seq in seqs if seq.slot is not None or seq.id in new])
        for job in list(self._live.values()):
            if job.admitted_seq.id in new or job.admitted_seq.finish_reason:
                self._deliver(job)

    def _deliver(self, job: Job) -> None:
        seq = job.admitted_seq
        final = seq.finish_reason is not None
        if not final and not (job.request.is_stream and len(seq.tokens) > job.num_sent):
            return
        if job.request.is_stream:
            ids, prefix_length = window(seq.tokens, job.num_sent, len(seq.tokens))
        else:  # one response: all tokens (after the prompt's, as TensorRT-LLM does unless excluded)
            ids, prefix_length = (seq.prompt + seq.tokens if job.request.prepend_prompt else seq.tokens), 0
        try:
            job.sink.send(outputs(seq, ids, prefix_length, final), final)
        except Exception:  # the client is gone: stop generating for it
            if not final:
                seq.finish_reason = "abort"
                self._abort(job)
                return
        job.num_sent = len(seq.tokens)
        if final:
            del self._live[seq.id]
            self.metrics.finished(seq)


def outputs(seq: Sequence, ids: list[int], prefix_length: int, final: bool) -> dict:
    """The engine model's output tensors for one response (batch dimension first)."""
    stats = seq.stats
    return {
        "output_ids": np.array([ids], dtype=np.int32).reshape(1, -1),
        "prefix_length": np.array([[prefix_length]], dtype=np.int32),
        "is_final": np.array([[final]], dtype=bool),
        "sequence_id": np.array([[seq.id]], dtype=np.uint64),  # what postprocessing names to cancel it
        "num_input_tokens": np.array([[len(seq.prompt)]], dtype=np.int32),
        "num_output_tokens": np.array([[len(seq.tokens)]], dtype=np.int32),
        "num_forward_passes": np.array([[stats.num_passes]], dtype=np.int32),
        # 0 where the mode accepts no drafts (ar, diffusion)
        "mean_accepted_length": np.array([[stats.mean_accepted_length or 0.0]], dtype=np.float32),
        "finish_reason": np.array([[(seq.finish_reason or "").encode()]], dtype=np.object_),
    }
