"""The OpenAI front end against hostile or broken clients, without a tritonserver (each case fails
before a call to Triton, or Triton's client is replaced): every case ends in an HTTP error with
OpenAI's error JSON, the server keeps serving, and no traceback reaches stderr. Raw sockets send
what no HTTP client would; the front ends' limits are small so that the cases are fast.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import statistics
import struct
import threading
import time

import pytest

from trimode.errors import ConfigError
from trimode.triton_repo import client
from trimode.triton_repo.openai_api import OpenAIFrontend
from trimode.triton_repo.openai_params import MAX_JSON_DEPTH
from trimode.triton_repo.server import Ports

TIMEOUT_S = 0.5  # the front ends' read_timeout_s
MAX_BODY = 2**18  # room for a body nested 100000 deep
UNREACHABLE = "127.0.0.1:1"  # no Triton: a request that reaches the call is a 503


@pytest.fixture(scope="module")
def repo_dir(tiny_deploy_dir):
    return tiny_deploy_dir / "repo"


def make(repo_dir, **limits) -> OpenAIFrontend:
    limits = {"read_timeout_s": TIMEOUT_S, "max_body_bytes": MAX_BODY, **limits}
    return OpenAIFrontend(repo_dir, UNREACHABLE, port=Ports.free().http, **limits)


@pytest.fixture(scope="module")
def frontend(repo_dir):
    with make(repo_dir) as frontend:
        yield frontend


@pytest.fixture(autouse=True)
def no_traceback(capfd):
    """No case may log a traceback: each is the client's fault."""
    yield
    time.sleep(0.05)  # a connection's thread may still be closing
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


def connect(frontend: OpenAIFrontend) -> socket.socket:
    return socket.create_connection(("127.0.0.1", frontend.port), timeout=10)


def read_response(connection: socket.socket) -> tuple[int, dict, dict]:
    """The next response on connection: its status, headers (lower-case names) and JSON body."""
    response = http.client.HTTPResponse(connection)
    response.begin()
    headers = {k.lower(): v for k, v in response.getheaders()}
    return response.status, headers, json.loads(response.read())


def exchange(frontend: OpenAIFrontend, raw: bytes) -> tuple[int, dict, dict]:
    with connect(frontend) as connection:
        connection.sendall(raw)
        return read_response(connection)


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def assert_error(answer: tuple[int, dict, dict], status: int, message: str, code: str | None = None) -> dict:
    got, headers, body = answer
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert message in body["error"]["message"]
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert code is None or body["error"]["code"] == code
    assert headers["content-type"] == "application/json"
    return body["error"]


def assert_serves(frontend: OpenAIFrontend) -> None:
    """A good request, on a fresh connection, still answers."""
    status, _, body = exchange(frontend, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and [m["id"] for m in body["data"]] == ["ar", "diffusion", "self_spec", "quadratic", "auto"]


def is_closed(connection: socket.socket, within_s: float = 10.0) -> bool:
    """The server closed connection (end of file, nothing else sent) within within_s."""
    connection.settimeout(within_s)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True


def reset(connection: socket.socket) -> None:
    """Close as a vanished client does: a reset, not an end of file."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def json_body(**body) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate is sent as its \\ud800 escape


@pytest.mark.parametrize(
    "path, body, param, where",
    [
        ("/v1/completions", {"model": "ar", "prompt": "a\ud800b"}, "prompt", "prompt:"),
        ("/v1/completions", {"model": "ar", "prompt": ["\udfff"]}, "prompt", "prompt[0]:"),
        ("/v1/completions", {"model": "ar", "prompt": "x", "stop": ["\n", "\ud83d"]}, "stop", "stop[1]:"),
        ("/v1/completions", {"model": "ar", "prompt": "x", "stop": "\ud800"}, "stop", "stop:"),
        (
            "/v1/chat/completions",
            {"model": "ar", "messages": [{"role": "user", "content": "hi \ud800"}]},
            "messages",
            "messages[0].content:",
        ),
        (
            "/v1/chat/completions",
            {"model": "ar", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
            "messages",
            "messages[0].content[0].text:",
        ),
    ],
)
def test_lone_surrogates_are_a_400(frontend, path, body, param, where):
    error = assert_error(exchange(frontend, post(path, json_body(**body))), 400, "a lone UTF-16 surrogate")
    assert error["param"] == param and error["message"].startswith(where)
    assert_serves(frontend)


def test_a_surrogate_pair_is_text(frontend):
    """A pair (an emoji as JSON escapes) is one character: it reaches Triton (unreachable here: 503)."""
    answer = exchange(frontend, post("/v1/completions", json_body(model="ar", prompt="\U0001f600", max_tokens=2)))
    assert_error(answer, 503, "no Triton server answers there", "unavailable")


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[" * 100_000, "not valid JSON (nested too deeply)"),  # json.loads: a RecursionError
        (
            b'{"model": "ar", "prompt": "x", "a": ' + b"[" * 500 + b"]" * 500 + b"}",
            f"a[0][0][0][0][0]...: nested deeper than {MAX_JSON_DEPTH}",
        ),
        (
            b'{"model": "ar", "prompt": "x", "a": [{"b": ' + b"[" * 40 + b"]" * 40 + b"}]}",
            "a[0].b[0][0][0]...: nested deeper",
        ),
        (b'{"prompt": "\xed\xa0\x80"}', "prompt: a lone UTF-16 surrogate"),  # as UTF-8 (json.loads takes it)
    ],
)
def test_deep_or_broken_json_is_a_400(frontend, body, message):
    assert_error(exchange(frontend, post("/v1/completions", body)), 400, message)
    assert_serves(frontend)


@pytest.mark.parametrize(
    "headers, status, message",
    [
        ("Content-Length: 1000000000000\r\n", 413, f"larger than this server takes ({MAX_BODY}, max_body_bytes)"),
        ("Content-Length: " + "9" * 5000 + "\r\n", 413, "max_body_bytes"),
        (f"Content-Length: {MAX_BODY + 1}\r\n", 413, "max_body_bytes"),
        ("", 411, "Content-Length header is required"),
        ("Transfer-Encoding: chunked\r\n", 411, "no chunked transfer encoding"),
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 411, "no chunked transfer encoding"),
        ("Content-Length: -1\r\n", 400, "Content-Length: expected one byte count"),
        ("Content-Length: 0x10\r\n", 400, "Content-Length: expected one byte count"),
        ("Content-Length: 2\r\nContent-Length: 3\r\n", 400, "Content-Length: expected one byte count"),
    ],
)
def test_body_size_is_checked_before_reading(frontend, headers, status, message):
    raw = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    with connect(frontend) as connection:
        connection.sendall(raw)  # and no body: the answer must not wait for one
        assert_error(read_response(connection), status, message)
        assert is_closed(connection)
    assert_serves(frontend)


def test_a_body_past_the_limit_sent_whole_still_gets_its_413(frontend):
    """The client sends all of it before reading: the server reads it away before closing (a close
    with unread input would reset the connection and could destroy the 413)."""
    body = b'{"prompt": "' + b"x" * (4 * MAX_BODY) + b'"}'
    assert_error(exchange(frontend, post("/v1/completions", body)), 413, "max_body_bytes")
    assert_serves(frontend)


def test_expect_100_continue(frontend):
    """100 Continue for a body within the limit; a final 413 at once for one past it."""
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n"
    body = json_body(model="nope", prompt="x")
    with connect(frontend) as connection:
        connection.sendall(head.format(len(body)).encode())
        assert connection.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        connection.sendall(body)
        assert_error(read_response(connection), 404, "The model 'nope' does not exist", "model_not_found")
    with connect(frontend) as connection:
        connection.sendall(head.format(MAX_BODY + 1).encode())
        assert_error(read_response(connection), 413, "max_body_bytes")
    assert_serves(frontend)


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", 408, "did not arrive within 0.5 s"),  # no end of headers
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{", 408, "did not arrive"),
        (b"GET /v1/mod", 408, "did not arrive"),  # half a request line
    ],
)
def test_a_request_that_never_arrives_is_a_408(frontend, raw, status, message):
    with connect(frontend) as connection:
        connection.sendall(raw)
        assert_error(read_response(connection), status, message, None)
        assert is_closed(connection)
    assert_serves(frontend)


def test_a_trickled_request_is_a_408(frontend):
    """A byte every 50 ms keeps each read short of the timeout: the whole request still has to arrive
    within read_timeout_s of its first byte."""
    raw = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 1000
    started = time.monotonic()
    with connect(frontend) as connection:
        for byte in raw:
            if select.select([connection], [], [], 0.05)[0]:
                break  # answered
            connection.sendall(bytes([byte]))
        assert_error(read_response(connection), 408, "did not arrive")
    assert time.monotonic() - started < 30  # not 1000 x 50 ms
    assert_serves(frontend)


def test_idle_connections_are_closed(frontend):
    """A connection that never sends, or sends nothing after a request, is closed without a word."""
    with connect(frontend) as silent, connect(frontend) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept)[0] == 200
        assert is_closed(silent) and is_closed(kept)
    assert_serves(frontend)


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"GARBAGE\r\n\r\n", 400, "Bad request syntax"),
        (b"GET /v1/models HTTP/7.0\r\n\r\n", 505, "Invalid HTTP version"),
        (b"PUT /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501, "unsupported method 'PUT'"),
        (b"GET /v1/models HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "Request-URI Too Long"),
    ],
)
def test_protocol_errors_have_openai_shape(frontend, raw, status, message):
    assert_error(exchange(frontend, raw), status, message)
    assert_serves(frontend)


def test_clients_that_vanish(frontend):
    """Reset before, while and after the server answers: no traceback, and it keeps serving."""
    for raw in (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", post("/v1/completions", json_body(model="ar"))):
        for pause_s in (0, 0.05):
            connection = connect(frontend)
            connection.sendall(raw)
            time.sleep(pause_s)
            reset(connection)
    connection = connect(frontend)
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    reset(connection)  # mid-body
    assert_serves(frontend)


def test_a_stream_whose_client_vanished_is_cancelled(repo_dir, monkeypatch):
    """The stream to Triton is closed (client.stream_grpc cancels its request) at the first event
    the gone client cannot take."""
    closed = threading.Event()

    def stream_grpc(url, model, inputs):
        try:
            for i in range(1000):
                yield {"text": f"t{i} ", "finish_reason": "", "num_input_tokens": 1, "num_output_tokens": i + 1}
                time.sleep(0.01)
        finally:
            closed.set()

    monkeypatch.setattr(client, "stream_grpc", stream_grpc)
    with make(repo_dir) as frontend:
        with connect(frontend) as connection:
            connection.sendall(post("/v1/completions", json_body(model="ar", prompt="x", stream=True)))
            assert connection.recv(4096).startswith(b"HTTP/1.1 200 OK")
            reset(connection)
        assert closed.wait(10)
        deadline = time.monotonic() + 10
        while frontend.num_in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert_serves(frontend)


def test_max_connections(repo_dir):
    """Past max_connections a connection gets a 503 and is closed, without a thread of its own; a
    slot freed is taken again."""
    with make(repo_dir, max_connections=2, read_timeout_s=30.0) as frontend:  # the held ones stay open
        held = [connect(frontend) for _ in range(2)]
        for connection in held:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(connection)[0] == 200
        num_threads = threading.active_count()
        refused = [connect(frontend) for _ in range(8)]
        for connection in refused:
            connection.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_response(connection)
            assert_error(answer, 503, "2 connections open (max_connections)", "too_many_connections")
            assert answer[1]["retry-after"] == "1"
        assert threading.active_count() <= num_threads
        for connection in refused:
            assert is_closed(connection)
            connection.close()
        held.pop().close()
        deadline = time.monotonic() + 10
        while (answer := exchange(frontend, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert answer[0] == 200
        held.pop().close()


@pytest.mark.parametrize(
    "message, status",
    [
        ("ar: the engine is draining and takes no new requests", 503),
        ("ar: [StatusCode.UNAVAILABLE] Socket closed", 503),
        ("ar: overloaded: 32 requests already wait; retry later", 503),
        ("ar: max_tokens (500) exceeds the engine's room", 400),
    ],
)
def test_triton_errors_map_to_http(frontend, monkeypatch, message, status):
    def infer(url, model, inputs):
        raise client.RemoteError(message)

    monkeypatch.setattr(client, "infer", infer)
    answer = exchange(frontend, post("/v1/completions", json_body(model="ar", prompt="x")))
    assert_error(answer, status, message, "unavailable" if status == 503 else None)
    assert_serves(frontend)


def test_unreachable_triton_is_a_503(frontend):
    answer = exchange(frontend, post("/v1/completions", json_body(model="ar", prompt="x", max_tokens=2)))
    assert answer[1]["retry-after"] == "1"
    assert_error(answer, 503, "no Triton server answers there", "unavailable")
    assert_serves(frontend)


def test_draining(repo_dir, monkeypatch):
    """After start_draining every new request, on a kept-alive connection too, is a 503 with
    Retry-After and closes its connection; the one in flight finishes."""
    release, results = threading.Event(), []

    def infer(url, model, inputs):
        release.wait(10)
        return {"text": "ok", "finish_reason": "length", "num_input_tokens": 1, "num_output_tokens": 1}

    monkeypatch.setattr(client, "infer", infer)
    with make(repo_dir, read_timeout_s=10.0) as frontend:
        kept = connect(frontend)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept)[0] == 200 and frontend.num_in_flight == 0
        request = post("/v1/completions", json_body(model="ar", prompt="x"))
        worker = threading.Thread(target=lambda: results.append(exchange(frontend, request)))
        worker.start()
        deadline = time.monotonic() + 10
        while frontend.num_in_flight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        frontend.start_draining()
        assert frontend.is_draining and frontend.num_in_flight == 1
        for connection in (kept, connect(frontend)):
            connection.sendall(request)
            answer = read_response(connection)
            assert answer[1]["retry-after"] == "1" and answer[1]["connection"] == "close"
            assert_error(answer, 503, "draining", "draining")
            assert is_closed(connection)
            connection.close()
        release.set()
        worker.join(10)
        assert results[0][0] == 200 and results[0][2]["choices"][0]["text"] == "ok"
        assert frontend.num_in_flight == 0


def request_latencies(frontend: OpenAIFrontend, n: int = 20) -> tuple[float, float]:
    """Median seconds of GET /v1/models on a fresh connection each, and on one kept-alive connection."""

    def timed(connection: http.client.HTTPConnection) -> float:
        started = time.perf_counter()
        connection.request("GET", "/v1/models")
        assert connection.getresponse().read()
        return time.perf_counter() - started

    fresh = []
    for _ in range(n):
        connection = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=10)
        fresh.append(timed(connection))
        connection.close()
    kept = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=10)
    timed(kept)  # connects
    kept_alive = [timed(kept) for _ in range(n)]
    kept.close()
    return statistics.median(fresh), statistics.median(kept_alive)


def test_keep_alive_is_not_slower(frontend):
    """A kept-alive request used to wait ~40 ms for its body (Nagle's algorithm against the client's
    delayed ACK): now within 5 ms of a fresh connection's (once more on a noisy box)."""
    fresh, kept = request_latencies(frontend)
    if kept > fresh + 0.005:
        fresh, kept = request_latencies(frontend)
    assert kept <= fresh + 0.005, f"kept-alive {kept * 1e3:.1f} ms, fresh {fresh * 1e3:.1f} ms"


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_body_bytes": 0}, "max_body_bytes: expected an integer >= 1, got 0"),
        ({"max_connections": 1.5}, "max_connections: expected an integer >= 1, got 1.5"),
        ({"read_timeout_s": 0}, "read_timeout_s: expected a number of seconds > 0, got 0"),
    ],
)
def test_bad_limits_are_refused(repo_dir, limits, message):
    with pytest.raises(ConfigError, match=message):
        OpenAIFrontend(repo_dir, UNREACHABLE, **limits)
