"""The engine model (python backend): loads the engine dir once and serves every mode.

execute() parses each request (request.py) and hands it to the EngineLoop (loop.py), which
batches requests of all modes in flight and answers through each request's response sender.
Bad input is answered at once with an error response, "overloaded" and "draining" with an
UNAVAILABLE one (retry later or elsewhere); nothing else blocks. The model is decoupled (many
responses per request: streaming, several prompts) or not (plain infer: one response), as
`trimode repo --decoupled/--no-decoupled` wrote it; the response sender serves both.

Cancellation. A client that cancels (gRPC: it closes its stream) must free its slot at once. A
request sent to this model directly reports it through its response sender. Through an ensemble
it does not: Triton 2.51 marks the ensemble's request cancelled and checks it only between steps,
so the engine step already running never hears of it (measured: `is_cancelled()` stays false and
`send` keeps succeeding until max_tokens; the python backend of 2.51 has no BLS cancel either).
The requests Triton makes for the later steps do carry the flag, so postprocessing, which runs on
every streamed response, sees it and sends this model a control request holding only
`cancel_sequence_id`; the loop aborts that sequence at the next step boundary. A non-streamed
request has no later step before its end, so a client that leaves it runs it to the end.
The id is the job's random handle (loop.py), which only the request's own responses carry.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import triton_python_backend_utils as pb_utils

from trimode.decoding.settings import env_switch
from trimode.errors import EngineError, TrimodeError
from trimode.triton_repo.loop import EngineLoop, Job, Outbox, Overloaded, Unavailable
from trimode.triton_repo.metrics import TritonMetrics
from trimode.triton_repo.request import parse_requests
from trimode.triton_repo.settings import DEFAULT_ENGINE_THREADS
from trimode.triton_repo.tensors import ENGINE_INPUTS

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Responses:
    """One request's response sender, shared by its rows (a request may hold several prompts, each its
    own Job): each row's responses carry its batch_index, and the response that finishes the last
    open row carries the final flag. Rows send from the loop thread, a refusal from execute(), both
    through the Outbox: a lock keeps them in order, and after the final flag a row's send raises (the
    loop then drops it); so does a send once the sender refused one (the client is gone).
    A non-decoupled model sends exactly one response (one row, not streamed), so a cancel answers
    with an error there, where a decoupled model sends the final flag alone."""

    def __init__(self, request, num_rows: int, is_decoupled: bool, outbox: Outbox):
        self._sender, self._outbox = request.get_response_sender(), outbox
        self._num_open, self._is_closed, self.is_decoupled = num_rows, False, is_decoupled
        self._is_gone = False  # the sender refused a response (set on the outbox's thread)
        self._num_queued = 0  # responses given to the outbox that have not left yet
        self._lock = threading.RLock()  # a send at once runs inside send()'s hold of it

    def send(self, outputs, is_row_final: bool, on_sent=lambda: None, at_once: bool = False) -> None:
        """on_sent(): called once the response has left (or failed to). at_once: send it now, from this
        thread, if none of this request's responses is still queued (Outbox.put)."""
        with self._lock:
            if self._is_closed or self._is_gone:
                raise ConnectionError("the request was answered already, or its client is gone")
            self._num_open -= is_row_final
            self._is_closed = self._num_open == 0
            flags = _FINAL if self._is_closed else 0
            at_once = at_once and self._num_queued == 0
            self._num_queued += 1
            self._outbox.put(lambda: self._send(outputs, flags, on_sent), at_once)

    def _send(self, outputs, flags: int, on_sent) -> None:
        try:
            tensors = [pb_utils.Tensor(k, v) for k, v in outputs.items()]
            self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)
        except Exception:  # noqa: BLE001 (the client is gone: the loop stops generating for it)
            self._is_gone = True
        finally:
            with self._lock:
                self._num_queued -= 1
            on_sent()

    def fail(self, message: str, code=None) -> None:
        """An error response, which ends the whole request (every row)."""
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        with self._lock:
            if not self._is_closed:
                self._is_closed = True
                self._outbox.put(lambda: self._final(pb_utils.InferenceResponse(error=error)))

    def close_row(self) -> None:
        """A row that ends with nothing more to say (cancelled)."""
        with self._lock:
            if self._is_closed:
                return
            self._num_open -= 1
            if self._num_open:
                return
            self._is_closed = True
            if self.is_decoupled:
                self._outbox.put(lambda: self._final(None))
            else:
                cancelled = pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)
                self._outbox.put(lambda: self._final(pb_utils.InferenceResponse(error=cancelled)))

    def _final(self, response) -> None:
        try:
            if response is None:
                self._sender.send(flags=_FINAL)
            else:
                self._sender.send(response, flags=_FINAL)
        except Exception:  # noqa: BLE001 (a cancelled request may refuse even the final flag; nothing is owed)
            pass

    def is_cancelled(self) -> bool:
        return self._is_gone or self._sender.is_cancelled()


class RowSink:
    """The loop's Sink for one row of a request (loop.py). Its first response leaves at once (the time
    to first token); it is busy while a response it was given has not left: the two counts are each
    written by one thread (the loop's, the outbox's)."""

    def __init__(self, responses: Responses):
        self.responses = responses
        self._num_given = self._num_left = 0

    def send(self, outputs, final: bool) -> None:
        self.responses.send(outputs, final, self._left, at_once=self._num_given == 0)
        self._num_given += 1

    def _left(self) -> None:
        self._num_left += 1

    def is_busy(self) -> bool:
        return self._num_left != self._num_given

    def fail(self, message: str) -> None:
        self.responses.fail(message)

    def close(self) -> None:
        self.responses.close_row()

    def is_cancelled(self) -> bool:
        return self.responses.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        from trimode.builder.engine_dir import load_engine

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # the thread layout (settings.py DEFAULT_ENGINE_THREADS): the repository's, or `trimode serve --threads`
        threads = int(os.environ.get("TRIMODE_ENGINE_THREADS") or params.get("threads") or DEFAULT_ENGINE_THREADS)
        torch.set_num_threads(threads)
        pb_utils.Logger.log_info(f"trimode engine model: {threads} torch threads")
        engine_dir = Path(params["engine_dir"])
        self.built = load_engine(engine_dir)  # checks the files and re-runs the self-test
        if self.built.manifest["digest_sha256"] != params.get("engine_digest", self.built.manifest["digest_sha256"]):
            raise EngineError(f"{engine_dir} was rebuilt after this repository was written; rerun `trimode repo`")
        self.vocab_size = self.built.checkpoint.spec.vocab_size
        self.is_decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled"))
        engine = self.built.new_engine()
        pool = engine.runner.cache
        pb_utils.Logger.log_info(
            f"trimode engine model: KV pool of {pool.num_blocks} blocks x {pool.block_size} positions "
            f"({pool.num_bytes / (1 << 20):.1f} MiB), {engine.config.max_slots} slots"
        )
        self.metrics = TritonMetrics(config["name"], self.built.config.max_slots, engine.runner.cache)
        # `trimode serve` names a file whose creation starts a drain (server.py; loop.py)
        drain_file = os.environ.get("TRIMODE_DRAIN_FILE")
        # the sends from a thread of their own (loop.py Outbox); TRIMODE_SEND_THREAD=0: from the loop's
        self.outbox = Outbox(env_switch("TRIMODE_SEND_THREAD", True))
        where = "a thread of their own" if self.outbox.is_threaded else "the engine loop's thread"
        pb_utils.Logger.log_info(f"trimode engine model: responses sent from {where}")
        self.loop = EngineLoop(
            engine,
            int(params["max_queued_requests"]),
            self.metrics,
            Path(drain_file) if drain_file else None,
            is_sent=self.outbox.is_empty,
        )

    def execute(self, requests):
        for request in requests:
            cancel = pb_utils.get_input_tensor_by_name(request, "cancel_sequence_id")
            if cancel is not None:  # a control request (module doc): nothing to generate
                self.loop.cancel(int(cancel.as_numpy().reshape(-1)[0]))
                _answer_control(request, self.is_decoupled)
                continue
            arrays = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in ENGINE_INPUTS}
            try:
                rows = parse_requests(
                    lambda name: None if arrays[name] is None else arrays[name].as_numpy(),
                    self.vocab_size,
                    self.is_decoupled,
                )
            except TrimodeError as e:
                self.metrics.rejected("invalid")
                Responses(request, 1, self.is_decoupled, self.outbox).fail(str(e))
                continue
            responses = Responses(request, len(rows), self.is_decoupled, self.outbox)
            try:
                for row in rows:
                    self.loop.submit(Job(row, RowSink(responses)))
            except Unavailable as e:
                self.metrics.rejected("draining")
                responses.fail(str(e), pb_utils.TritonError.UNAVAILABLE)
            except Overloaded as e:
                self.metrics.rejected("overloaded")
                responses.fail(str(e), pb_utils.TritonError.UNAVAILABLE)
        return None  # the responses go through each request's sender (decoupled or not)

    def finalize(self) -> None:
        self.loop.stop()
        self.outbox.stop()
        self.metrics.close()


def _answer_control(request, is_decoupled: bool) -> None:
    """A control request gets the final flag alone (decoupled), or one empty response."""
    sender = request.get_response_sender()
    if is_decoupled:
        sender.send(flags=_FINAL)
    else:
        sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=_FINAL)
