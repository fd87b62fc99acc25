"""The engine model's parts without a server: the loop (in-flight joins, streaming, cancel, bounded
queue, a failing sink), request parsing, and the stateless streamed detokenization; and without
tritonserver, what `generate --url` says of a port that speaks another protocol or none, and what
`serve` says of a bad --host."""

from __future__ import annotations

import contextlib
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
from trimode.triton_repo.request import Request, parse_request
from trimode.triton_repo.server import Ports
from trimode.triton_repo.text import new_text, window


class ListSink:
    def __init__(self, fail_after: int | None = None):
        self.responses: list[dict] = []
        self.error: str | None = None
        self.cancelled = False
        self.closed = False
        self.fail_after = fail_after
        self.done = threading.Event()

    def send(self, outputs, final: bool) -> None:
        if self.fail_after is not None and len(self.responses) >= self.fail_after:
            raise ConnectionError("client gone")
        self.responses.append(outputs)
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
    assert {int(r["sequence_id"][0, 0]) for r in streamed} == {0}


@pytest.mark.parametrize("how", ["sink", "cancel_id", "send_fails"])
def test_cancelled_request_frees_its_slot(engine, how):
    loop = EngineLoop(engine, max_queued=8)
    try:
        sink = ListSink(fail_after=1 if how == "send_fails" else None)
        loop.submit(Job(request([3, 4], max_tokens=40, stream=True), sink))
        while not sink.responses:
            threading.Event().wait(0.01)
        if how == "sink":
            sink.cancelled = True
        elif how == "cancel_id":
            loop.cancel(int(sink.responses[0]["sequence_id"][0, 0]))
        for _ in range(500):
            if not engine.has_work:
                break
            threading.Event().wait(0.01)
        assert not engine.has_work and engine.runner.num_free == 2  # the slot is back in the pool
        assert len(sink.responses) < 40
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
        ({"min_length": 3}, "min_length=3"),
        ({"max_tokens": 0}, "max_tokens: expected an integer >= 1"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"threshold": 1.5}, "threshold"),
        ({"end_id": 10**6}, "end_id"),
        ({"return_log_probs": True}, "log probabilities"),
    ],
)
def test_parse_request_refuses(values, message):
    a = arrays(**values)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse_request(a.get, vocab_size=100, default_block_length=4)


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
    r = parse_request(a.get, vocab_size=100, default_block_length=4)
    assert r.prompt == [1, 2, 3] and r.is_stream and not r.prepend_prompt
    assert r.sampling.temperature == 0.0 and r.sampling.seed == 9 and r.sampling.ignore_eos  # top_k 1: greedy
    assert r.decoding.block_length == 8 and r.decoding.threshold == 0.5
    a = arrays(exclude_input_in_output=False)
    assert parse_request(a.get, 100, 4).prepend_prompt
    with pytest.raises(InputError, match="required"):
        parse_request({k: v for k, v in arrays().items() if k != "max_tokens"}.get, 100, 4)


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
