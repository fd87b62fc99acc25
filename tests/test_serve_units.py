"""The engine model's parts without a server: the loop (in-flight joins, streaming, cancel, bounded
queue, a failing sink), request parsing, and the stateless streamed detokenization; and without
tritonserver, what `generate --url` says of a port that speaks another protocol or none, and what
`serve` says of a bad --host."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import socket
import threading

import numpy as np
import pytest

from trimode.decoding import DecodeConfig, SamplingParams
from trimode.decoding.engine import Engine
from trimode.decoding.settings import EngineConfig
from trimode.errors import InputError
from trimode.triton_repo.loop import EngineLoop, Job, Overloaded
from trimode.triton_repo.request import Request, parse_requests
from trimode.triton_repo.response import unpack
from trimode.triton_repo.server import Ports
from trimode.triton_repo.text import new_text, window


class ListSink:
    def __init__(self, fail_after: int | None = None, then=None):
        """then(response): called after each response is kept, on the thread that sent it."""
        self.then = then
        self.responses: list[dict] = []
        self.error: str | None = None
        self.cancelled = False
        self.closed = False
        self.fail_after = fail_after
        self.done = threading.Event()

    def send(self, outputs, final: bool) -> None:
        if self.fail_after is not None and len(self.responses) >= self.fail_after:
            raise ConnectionError("client gone")
        self.responses.append(unpack(outputs.__getitem__))  # as postprocessing reads them
        if self.then is not None:
            self.then(self.responses[-1])
        if final:
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()

    def close(self) -> None:
        self.closed = True
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled

    def is_busy(self) -> bool:
        return False


def request(prompt, max_tokens=6, stream=False, mode="ar") -> Request:
    return Request(prompt, SamplingParams(max_tokens, ignore_eos=True), DecodeConfig(mode, 4), stream, False)


@pytest.fixture
def engine(tiny):
    return Engine(tiny.model, EngineConfig(max_slots=2, max_seq_len=64))


def solo(engine_factory, prompt, max_tokens, mode="ar") -> list[int]:
    engine = engine_factory()
    seq = engine.add(prompt, SamplingParams(max_tokens, ignore_eos=True), DecodeConfig(mode, 4))
    while engine.has_work:
        engine.step()
    return seq.tokens


def tokens(sink: ListSink) -> list[int]:
    final = sink.responses[-1]
    return [int(t) for t in final["output_ids"].reshape(-1)]


def test_loop_batches_streams_and_matches_solo(tiny, engine):
    loop = EngineLoop(engine, max_queued=8)
    try:
        prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12]]  # 3 requests, 2 slots: one waits and joins later
        sinks = [ListSink() for _ in prompts]
        for i, (p, s) in enumerate(zip(prompts, sinks)):
            loop.submit(Job(request(p, stream=i == 0, mode=("ar", "self-spec", "diffusion")[i]), s))
        assert all(s.done.wait(60) for s in sinks)
    finally:
        loop.stop()
    make = lambda: Engine(tiny.model, EngineConfig(max_slots=2, max_seq_len=64))  # noqa: E731
    assert tokens(sinks[1]) == solo(make, prompts[1], 6, "self-spec")
    assert tokens(sinks[2]) == solo(make, prompts[2], 6, "diffusion")
    streamed = sinks[0].responses  # one response per step, each with its new tokens after a window prefix
    assert len(streamed) == 6 and [int(r["num_output_tokens"][0, 0]) for r in streamed] == [1, 2, 3, 4, 5, 6]
    new = [int(t) for r in streamed for t in r["output_ids"].reshape(-1)[int(r["prefix_length"][0, 0]) :]]
    assert new == solo(make, prompts[0], 6)
    assert [bool(r["is_final"][0, 0]) for r in streamed] == [False] * 5 + [True]
    handles = {int(r["sequence_id"][0, 0]) for r in streamed}  # one, random (not the engine's sequence id 0)
    assert len(handles) == 1 and handles != {0} and handles != {int(sinks[1].responses[-1]["sequence_id"][0, 0])}


class BusySink(ListSink):
    """A sink whose responses leave slowly (a send thread behind a busy pipeline): each one stays
    in flight for the next `hold` times the loop asks."""

    def __init__(self, hold: int):
        super().__init__()
        self.hold, self.asked = hold, 0

    def send(self, outputs, final: bool) -> None:
        super().send(outputs, final)
        self.asked = 0

    def is_busy(self) -> bool:
        self.asked += 1
        return self.asked <= self.hold


@pytest.mark.parametrize("mode", ["ar", "self-spec"])
def test_a_busy_stream_gets_fewer_larger_responses(tiny, engine, mode):
    """While a row's response is in flight its new tokens wait and go out together in the next one:
    the streamed tokens are the same, in order, and the last response (final) is never held back."""
    loop = EngineLoop(engine, max_queued=8)
    sink = BusySink(hold=2)
    try:
        loop.submit(Job(request([3, 4, 5], max_tokens=12, stream=True, mode=mode), sink))
        assert sink.done.wait(60)
    finally:
        loop.stop()
    make = lambda: Engine(tiny.model, EngineConfig(max_slots=2, max_seq_len=64))  # noqa: E731
    streamed = sink.responses
    new = [int(t) for r in streamed for t in r["output_ids"].reshape(-1)[int(r["prefix_length"][0, 0]) :]]
    assert new == solo(make, [3, 4, 5], 12, mode)
    counts = [int(r["num_output_tokens"][0, 0]) for r in streamed]
    assert all(a < b for a, b in zip(counts, counts[1:])) and counts[-1] == 12
    assert len(streamed) <= 12 // 3 + 2  # a response at most every third step, and the final one
    assert [bool(r["is_final"][0, 0]) for r in streamed] == [False] * (len(streamed) - 1) + [True]


@pytest.mark.parametrize("how", ["sink", "cancel_id", "send_fails"])
def test_cancelled_request_frees_its_slot(engine, how, monkeypatch):
    """The client goes as its first response arrives (a request's first response leaves from the
    loop's thread, so the cancel is in before its next step; the sink is polled at every step here):
    the request ends there, whatever the machine's speed."""
    import trimode.triton_repo.loop as loop_module

    monkeypatch.setattr(loop_module, "SENDER_POLL_S", 0.0)
    loop = EngineLoop(engine, max_queued=8)

    def cancel(response: dict) -> None:
        if how == "sink":
            sink.cancelled = True
        elif how == "cancel_id":
            loop.cancel(int(response["sequence_id"][0, 0]))

    try:
        sink = ListSink(fail_after=1 if how == "send_fails" else None, then=cancel)
        loop.submit(Job(request([3, 4], max_tokens=40, stream=True), sink))
        while not sink.responses:
            threading.Event().wait(0.01)
        for _ in range(500):  # both: the loop thread may be between the two when this one looks
            if not engine.has_work and engine.runner.num_free == 2:
                break
            threading.Event().wait(0.01)
        assert not engine.has_work and engine.runner.num_free == 2  # the slot is back in the pool
        assert len(sink.responses) == 1
        assert sink.closed == (how != "send_fails")
        other = ListSink()  # the freed slot serves the next request
        loop.submit(Job(request([5, 6], max_tokens=3), other))
        assert other.done.wait(30) and int(other.responses[-1]["num_output_tokens"][0, 0]) == 3
    finally:
        loop.stop()


def test_bounded_queue_says_overloaded(engine):
    loop = EngineLoop(engine, max_queued=1)
    try:
        sinks = [ListSink() for _ in range(6)]
        refused = 0
        for s in sinks:
            try:
                loop.submit(Job(request([3, 4], max_tokens=20), s))
            except Overloaded as e:
                assert "overloaded" in str(e) and "retry later" in str(e)
                refused += 1
                s.done.set()
        assert refused == 3  # all 6 sent at once: the 2 free slots + 1 queued are taken, the rest refused
        assert all(s.done.wait(60) for s in sinks)
        assert all(s.error is None for s in sinks)
    finally:
        loop.stop()


def test_bad_request_fails_only_itself(engine):
    loop = EngineLoop(engine, max_queued=8)
    try:
        bad, good = ListSink(), ListSink()
        loop.submit(Job(request([3, 4], max_tokens=500), bad))  # past max_seq_len
        loop.submit(Job(request([3, 4], max_tokens=2), good))
        assert bad.done.wait(30) and good.done.wait(30)
        assert "max_tokens (500)" in bad.error and good.error is None
    finally:
        loop.stop()


def test_a_packed_response_unpacks_to_the_ensembles_tensors(engine):
    """The engine's four tensors (response.py) carry every value and dtype of the ensemble's outputs."""
    from trimode.triton_repo import tensors
    from trimode.triton_repo.response import pack

    seq = engine.add([3, 4, 5], SamplingParams(7, ignore_eos=True, logprobs=2), DecodeConfig("self-spec", 4))
    while engine.has_work:
        engine.step()
    assert seq.stats.accepted_lengths and seq.finish_reason == "length"
    handle, new = (1 << 63) - 1, slice(2, 7)
    out = unpack(pack(seq, seq.tokens[-4:], 1, True, handle, 3, new).__getitem__)
    kinds = {"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_, "STRING": np.object_}
    for t in tensors.PASSED_ON:
        assert out[t.name].dtype == kinds[t.dtype] and out[t.name].ndim == 1 + len(t.dims), t.name
    assert out["output_ids"].tolist() == [seq.tokens[-4:]] and int(out["prefix_length"][0, 0]) == 1
    assert bool(out["is_final"][0, 0]) and int(out["sequence_id"][0, 0]) == handle
    assert int(out["batch_index"][0, 0]) == 3 and int(out["sequence_index"][0, 0]) == 0
    assert int(out["num_input_tokens"][0, 0]) == 3 and int(out["num_output_tokens"][0, 0]) == 7
    assert int(out["num_forward_passes"][0, 0]) == seq.stats.num_passes
    assert out["mean_accepted_length"][0, 0] == np.float32(seq.stats.mean_accepted_length)
    assert out["finish_reason"][0, 0] == b"length"
    assert out["output_token_ids"].tolist() == [seq.tokens[new]]
    assert out["output_log_probs"].tolist() == [[np.float32(seq.logprobs[new]).tolist()]]
    assert out["cum_log_probs"][0, 0] == np.float32(sum(seq.logprobs[:7]))
    assert out["top_log_prob_ids"].tolist() == [[[t for t, _ in top] for top in seq.top_logprobs[new]]]
    assert out["top_log_probs"].shape == (1, 5, 2)
    seq.params = dataclasses.replace(seq.params, logprobs=None)  # none asked: the empty tensors
    empty = unpack(pack(seq, seq.tokens, 0, False, 1, 0, slice(0, 7)).__getitem__)
    assert [empty[t.name].shape for t in tensors.LOG_PROBS] == [(1, 0), (1, 1, 0), (1, 0, 0), (1, 0, 0), (1, 0)]
    assert not empty["is_final"][0, 0]


def arrays(**values) -> dict:
    out = {
        "input_ids": np.array([[1, 2, 3]], np.int32),
        "mode": np.array([[b"ar"]], np.object_),
        "max_tokens": np.array([[4]], np.int32),
    }
    out.update({k: np.array([[v]]) for k, v in values.items()})
    return out


@pytest.mark.parametrize(
    "values, message",
    [
        ({"beam_width": 2}, "beam search"),
        ({"top_k": 5}, "top_k=5"),
        ({"top_p": 0.9}, "top_p=0.9"),
        ({"min_length": 3}, "min_tokens=3"),
        ({"min_tokens": 3}, "min_tokens=3"),
        ({"seed": 1, "random_seed": 2}, "current and its older name"),
        ({"return_perf_metrics": True}, "return_perf_metrics"),
        ({"num_top_log_probs": 21}, "num_top_log_probs"),
        ({"max_tokens": 0}, "max_tokens: expected an integer >= 1"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"threshold": 1.5}, "threshold"),
        ({"end_id": 10**6}, "end_id"),
        ({"stream": True}, "streaming needs a repository written with"),
        ({"mode": b"\xff\xfe"}, "mode: expected ar, diffusion or self-spec"),
        ({"mode": b"beam"}, "mode: expected one of"),
        ({"input_lengths": -1}, "input_lengths: expected 1..3"),
    ],
)
def test_parse_request_refuses(values, message):
    a = arrays(**values)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse_requests(a.get, vocab_size=100, is_decoupled="stream" not in values)


def test_parse_request_honours():
    a = arrays(
        top_k=1,
        temperature=0.7,
        random_seed=9,
        end_id=-1,
        stream=True,
        beam_width=1,
        top_p=1.0,
        block_length=8,
        threshold=0.5,
    )
    (r,) = parse_requests(a.get, vocab_size=100)
    assert r.prompt == [1, 2, 3] and r.is_stream and not r.prepend_prompt
    assert r.sampling.temperature == 0.0 and r.sampling.seed == 9 and r.sampling.ignore_eos  # top_k 1: greedy
    assert r.decoding.block_length == 8 and r.decoding.threshold == 0.5
    assert parse_requests(arrays(seed=9).get, 100)[0].sampling.seed == 9  # the current name
    assert parse_requests(arrays(return_log_probs=True).get, 100)[0].sampling.logprobs == 0
    assert parse_requests(arrays(num_top_log_probs=3).get, 100)[0].sampling.logprobs == 3
    assert parse_requests(arrays().get, 100)[0].sampling.logprobs is None
    a = arrays(exclude_input_in_output=False)
    assert parse_requests(a.get, 100)[0].prepend_prompt
    with pytest.raises(InputError, match="required"):
        parse_requests({k: v for k, v in arrays().items() if k != "max_tokens"}.get, 100)


def test_parse_request_rows():
    """A request of several prompts (TensorRT-LLM's batch > 1): padded input_ids cut at input_lengths, an
    input of one row applies to every prompt, one of as many rows gives each its own value."""
    a = arrays()
    a["input_ids"] = np.array([[1, 2, 3], [4, 5, -1]], np.int32)
    a["input_lengths"] = np.array([[3], [2]], np.int32)
    a["mode"] = np.array([[b"ar"], [b"ar"]], np.object_)
    a["temperature"] = np.array([[0.5], [0.0]], np.float32)
    a["stop_ids"] = np.array([[7, -1], [8, 9]], np.int32)
    rows = parse_requests(a.get, 100)
    assert [r.prompt for r in rows] == [[1, 2, 3], [4, 5]] and [r.batch_index for r in rows] == [0, 1]
    assert [r.sampling.temperature for r in rows] == [0.5, 0.0]
    assert [r.sampling.max_new_tokens for r in rows] == [4, 4]
    assert [r.sampling.stop_token_ids for r in rows] == [(7,), (8, 9)]
    with pytest.raises(InputError, match="needs a streaming repository"):
        parse_requests(a.get, 100, is_decoupled=False)
    a["max_tokens"] = np.array([[1], [2], [3]], np.int32)
    with pytest.raises(InputError, match="3 rows for a request of 2 prompts"):
        parse_requests(a.get, 100)


def test_streamed_text_concatenates_to_the_whole(tiny):
    decode = tiny.tokenizer.decode
    ids = tiny.tokenizer.encode("déjà vu — naïve café ✓ ok") * 2
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        sent, prefix = window(ids, start, end)
        assert prefix <= 8 and sent[prefix:] == ids[start:end]
        pieces.append(new_text(decode, sent, prefix, end == len(ids)))
        start = end
    assert "".join(pieces) == decode(ids)


# ---- the wrong port, or none: one error line that says which protocol did not answer ----------------------


@pytest.fixture
def http2_port():
    """A port that answers as gRPC's HTTP/2 does (a SETTINGS frame, then it closes), as Triton's gRPC port
    answers an HTTP/1.1 request."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                conn.settimeout(0.2)
                with contextlib.suppress(OSError):  # read the whole request: unread bytes would reset the connection
                    while conn.recv(65536):
                        pass
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

    threading.Thread(target=answer, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def http1_port():
    """A plain HTTP/1.1 server, which refuses gRPC's HTTP/2 preface."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "protocol, port, hint",
    [
        ("http", "http2_port", "is that the gRPC port? pass --protocol grpc"),
        ("grpc", "http1_port", "is that the HTTP port? pass --protocol http"),
        ("http", "free_port", "nothing listens there"),
        ("grpc", "free_port", "nothing listens there"),
    ],
)
def test_generate_url_of_the_wrong_protocol_or_no_server(refused, request, tmp_path, protocol, port, hint, stream):
    port = Ports.free().http if port == "free_port" else request.getfixturevalue(port)
    result = refused(
        ["generate", "--url", f"127.0.0.1:{port}", "--protocol", protocol, *(["--stream"] * stream), "hi"],
        tmp_path,
        hint,
    )
    assert result.error.startswith(f"Error: --url 127.0.0.1:{port}: no Triton server answers there over {protocol} (")


@pytest.mark.parametrize(
    "host, message",
    [
        ("999.1.1.1", "--host 999.1.1.1: not a valid IP address or a host name this machine knows"),
        ("no-such-host.invalid", "--host no-such-host.invalid: not a valid IP address"),
        ("192.0.2.1", "--host 192.0.2.1: not an address of this machine"),  # TEST-NET-1: never local
        ("", "--host : not a valid IP address"),
    ],
)
def test_serve_refuses_a_bad_host(refused, tmp_path, host, message):
    """Checked first, before the repository and before tritonserver (whose error would blame a port)."""
    refused(["serve", tmp_path / "repo", "--host", host], tmp_path, message)


@pytest.mark.parametrize("name", ["TRIMODE_SEND_THREAD", "TRIMODE_ASYNC_STEPS", "TRIMODE_PASS_GRAPHS"])
def test_serve_refuses_a_bad_switch_before_the_server_starts(refused, tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, "true")
    refused(["serve", tmp_path / "repo"], tmp_path, f"{name}='true': expected 1 (on) or 0 (off)")


def test_a_foreign_cancel_touches_nothing(engine):
    """Handles are random: counting (the engine's ids are 0, 1, 2, ...) names no running request."""
    loop = EngineLoop(engine, max_queued=8)
    try:
        sink = ListSink()
        loop.submit(Job(request([3, 4], max_tokens=30, stream=True), sink))
        while not sink.responses:
            threading.Event().wait(0.01)
        own = int(sink.responses[0]["sequence_id"][0, 0])
        for guess in [*range(64), own + 1, own - 1]:
            loop.cancel(guess)
        assert sink.done.wait(60) and not sink.closed and sink.error is None
        assert int(sink.responses[-1]["num_output_tokens"][0, 0]) == 30
    finally:
        loop.stop()


def test_log_probs_ride_with_the_tokens(engine):
    """Streamed: each response has its new tokens' log probs, cum_log_probs their running sum; the whole
    response has all of them; a request that asked for none gets empty tensors."""
    loop = EngineLoop(engine, max_queued=8)
    try:
        asked = Request([3, 4, 5], SamplingParams(5, ignore_eos=True, logprobs=2), DecodeConfig("ar", 4), True, False)
        whole = Request([3, 4, 5], SamplingParams(5, ignore_eos=True, logprobs=0), DecodeConfig("ar", 4), False, False)
        sinks = [ListSink(), ListSink(), ListSink()]
        for r, s in zip([asked, whole, request([3, 4, 5], max_tokens=5)], sinks):
            loop.submit(Job(r, s))
        assert all(s.done.wait(60) for s in sinks)
    finally:
        loop.stop()
    streamed = sinks[0].responses
    per_token = [float(v) for r in streamed for v in r["output_log_probs"].reshape(-1)]
    assert len(per_token) == 5 and all(v <= 0 for v in per_token)
    running = np.cumsum(per_token)
    assert [float(r["cum_log_probs"][0, 0]) for r in streamed] == pytest.approx(list(running), rel=1e-5)
    for r in streamed:
        assert r["top_log_probs"].shape == (1, 1, 2) and r["top_log_prob_ids"].shape == (1, 1, 2)
        # greedy: the emitted token is the most likely one
        assert float(r["top_log_probs"][0, 0, 0]) == pytest.approx(float(r["output_log_probs"][0, 0, 0]))
    final = sinks[1].responses[-1]
    assert final["output_log_probs"].reshape(-1).tolist() == pytest.approx(per_token, rel=1e-5)
    assert final["top_log_probs"].shape == (1, 5, 0)
    assert [int(t) for r in streamed for t in r["output_token_ids"].reshape(-1)] == tokens(sinks[1])
    assert sinks[2].responses[-1]["output_log_probs"].shape == (1, 1, 0)
    assert sinks[2].responses[-1]["cum_log_probs"].shape == (1, 0)


def test_draining_refuses_new_work_and_finishes_the_old(engine, tmp_path):
    """... and is done only once every response has left (is_sent: the engine model's Outbox)."""
    from trimode.triton_repo.loop import Unavailable

    drain, released, asked = tmp_path / "drain", threading.Event(), []

    def is_sent() -> bool:
        asked.append(released.is_set())
        return released.is_set()

    loop = EngineLoop(engine, max_queued=8, drain_file=drain, is_sent=is_sent)
    try:
        sink = ListSink()
        loop.submit(Job(request([3, 4], max_tokens=20, stream=True), sink))
        drain.touch()
        for _ in range(500):
            if loop.is_draining:
                break
            threading.Event().wait(0.01)
        with pytest.raises(Unavailable, match="draining"):
            loop.submit(Job(request([5, 6], max_tokens=2), ListSink()))
        assert sink.done.wait(60) and sink.error is None
        assert int(sink.responses[-1]["num_output_tokens"][0, 0]) == 20  # the accepted request ran to its end
        done = tmp_path / "drain.done"
        for _ in range(500):  # idle: the loop asks whether its responses have left, and they have not
            if len(asked) >= 2:
                break
            threading.Event().wait(0.01)
        assert len(asked) >= 2 and not done.exists()
        released.set()
        for _ in range(500):
            if done.exists():
                break
            threading.Event().wait(0.01)
        assert done.exists()
    finally:
        loop.stop()


def test_the_outbox_sends_in_order_and_says_when_it_is_empty():
    from trimode.triton_repo.loop import Outbox

    sent, gate, outbox = [], threading.Event(), Outbox(threaded=True)
    outbox.put(lambda: gate.wait(30) and sent.append(0))  # holds the outbox's thread until the gate opens
    for i in range(1, 50):
        outbox.put(lambda i=i: sent.append(i))
    assert not outbox.is_empty() and sent == []
    gate.set()
    outbox.stop()  # after everything put is sent
    assert sent == list(range(50)) and outbox.is_empty()
    first = Outbox(threaded=True)  # a first token: on the caller's thread, now, ahead of what is queued
    gate.clear()
    first.put(lambda: gate.wait(30) and sent.append("held"))
    first.put(lambda: sent.append("queued"))
    first.put(lambda: sent.append(threading.current_thread()), at_once=True)
    assert sent[-1] is threading.current_thread() and not first.is_empty()
    gate.set()
    first.stop()
    assert sent[-2:] == ["held", "queued"] and first.is_empty()
    at_once = Outbox(threaded=False)  # no core to spare: on the caller's thread, before put returns
    at_once.put(lambda: sent.append(threading.current_thread()))
    assert sent[-1] is threading.current_thread() and at_once.is_empty()
    at_once.put(lambda: 1 / 0)  # a sender's failure is its own: the outbox goes on
    at_once.put(lambda: sent.append("after"))
    assert sent[-1] == "after"


def test_the_log_line_that_says_why_tritonserver_stopped():
    """A model that failed to load is the cause, named without the Python frames Triton appends;
    the generic last error line only where none did."""
    from trimode.triton_repo.server import log_cause

    failed = (
        'I1207 23:37:29.3 1 pb_stub.cc:366] "Failed to initialize Python stub: EngineError: bad"\n'
        "E1207 23:37:30.05 1 model_lifecycle.cc:642] \"failed to load 'engine' version 1: Internal: "
        "EngineError: /e/step_times.json: unreadable (JSONDecodeError); or delete the file\\n\\nAt:\\n  "
        '/w/engine_dir.py(207): read_step_times\\n"\n'
        "E1207 23:37:30.06 1 model_repository_manager.cc:703] \"Invalid argument: ensemble 'ar' depends on 'engine'\"\n"
        'I1207 23:37:32.06 1 server.cc:345] "Timeout 28: Found 0 live models"\n'
        "error: creating server: Internal - failed to load all models\n"
    )
    assert log_cause(failed) == (
        "failed to load 'engine' version 1: Internal: EngineError: /e/step_times.json: unreadable "
        "(JSONDecodeError); or delete the file"
    )
    assert log_cause("I0 started\nE1 port in use\nI2 bye\n") == "E1 port in use"
    assert log_cause("I0 started\n") == "I0 started" and log_cause("") == ""
