"""A hardened HTTP/1.1 server for JSON and server-sent events: what the OpenAI front end
(openai_api.py) serves its routes with. A stdlib ThreadingHTTPServer: one thread per connection,
HTTP/1.1 keep-alive, chunked SSE.

Limits against hostile or broken clients, each answered with OpenAI's error JSON: a body past
max_body_bytes is refused from its Content-Length, unread (413); a request must arrive whole within
read_timeout_s of its first byte (408), and an idle keep-alive connection closes after as long;
past max_connections a connection gets a 503 from the accepting thread and no thread of its own.
Why not an ASGI stack: the work per request is a blocking gRPC call that the engine batches, so
threads cost nothing an event loop would save at these connection counts, and each limit above is
a few lines here. The one measured gap, 40 ms per kept-alive response (Nagle's algorithm against
the client's delayed ACK), was the socket's: TCP_NODELAY and one write per response close it.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

from trimode.errors import ConfigError
from trimode.triton_repo.openai_params import APIError

RETRY_AFTER_S = 1  # the Retry-After of every 503
LINGER_S = 1.0  # how long a connection closed with its request unread still reads (see JSONHandler.finish)

_S = TypeVar("_S", bound="HTTPService")


class HTTPService:
    """Serves handler_class (a JSONHandler, which finds this as self.server.service) on host:port
    under the limits of the module doc: open() listens, start() serves in a thread, stop() ends it."""

    def __init__(
        self,
        handler_class: type[JSONHandler],
        host: str,
        port: int,
        *,
        max_body_bytes: int = 4 * 2**20,
        read_timeout_s: float = 30.0,
        max_connections: int = 256,
    ):
        for name, value in (("max_body_bytes", max_body_bytes), ("max_connections", max_connections)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
        if not (isinstance(read_timeout_s, (int, float)) and read_timeout_s > 0):
            raise ConfigError(f"read_timeout_s: expected a number of seconds > 0, got {read_timeout_s!r}")
        self.max_body_bytes, self.read_timeout_s, self.max_connections = max_body_bytes, read_timeout_s, max_connections
        self.handler_class, self.host, self.port = handler_class, host, port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.is_draining = False  # start_draining()
        self.num_in_flight = 0  # requests read and not yet answered in full (idle connections are not counted)
        self._lock = threading.Lock()

    def start_draining(self) -> None:
        """From now on every new request is answered 503 (with Retry-After) and its connection closed;
        requests in flight finish. Wait for num_in_flight to reach 0, then stop()."""
        self.is_draining = True

    def count_in_flight(self, delta: int) -> None:
        with self._lock:
            self.num_in_flight += delta

    def open(self: _S) -> _S:
        """Listen now (requests wait in the backlog until start); OSError if the port cannot be had."""
        if self._httpd is None:
            server_class = _Server6 if ":" in self.host else _Server
            self._httpd = server_class((self.host, self.port), self.handler_class)
            self._httpd.service = self
        return self

    def start(self: _S) -> _S:
        self.open()
        assert self._httpd is not None  # open() made it
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="openai-frontend", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every open connection and wait for their threads: an idle keep-alive
        connection ends at once, a stream in flight fails its next write (its handler cleans up), a
        whole answer in flight is still sent."""
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join()
            self._httpd.close_connections()
            self._httpd.server_close()  # joins the connections' threads
            self._httpd = self._thread = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # stop() ends the connections, then joins their threads
    service: HTTPService

    def __init__(self, *args, **kwargs):
        self._connections: set[socket.socket] = set()
        self._refused: list[tuple[socket.socket, float]] = []  # answered 503, read until EOF or a deadline
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            is_full = len(self._connections) >= self.service.max_connections
            if not is_full:
                self._connections.add(request)
        if is_full:
            self._refuse(request)
        else:
            super().process_request(request, client_address)

    def _refuse(self, connection: socket.socket) -> None:
        """Past max_connections: a 503, written here in the accepting thread (a few hundred bytes fit
        the socket's buffer), then read and closed by service_actions."""
        limit = self.service.max_connections
        message = f"the server has {limit} connections open (max_connections); retry later"
        data = json.dumps(APIError(503, message, None, "too_many_connections", "server_error").body()).encode()
        head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        try:
            connection.setblocking(False)
            connection.send(f"{head}Retry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n".encode() + data)
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            connection.close()
            return
        self._refused.append((connection, time.monotonic() + LINGER_S))
        if len(self._refused) > limit:  # a flood of them: the oldest is closed as it is
            self._refused.pop(0)[0].close()

    def service_actions(self) -> None:
        """After each accept or poll: read what refused clients sent, close those done or past LINGER_S."""
        now, kept = time.monotonic(), []
        for connection, deadline in self._refused:
            try:
                for _ in range(16):
                    if not connection.recv(65536):
                        break  # end of file: closed below
                else:
                    raise BlockingIOError  # still sending: wait for the deadline
            except BlockingIOError:
                if now < deadline:
                    kept.append((connection, deadline))
                    continue
            except OSError:
                pass
            connection.close()
        self._refused = kept

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A connection's error is the client's (gone, reset, too slow): no traceback for it."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """A handler waiting for the next request on a keep-alive connection reads end-of-file and
        returns; one streaming an answer fails its next write."""
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the client
            for connection, _ in self._refused:
                connection.close()
            self._refused = []


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Reader(io.RawIOBase):
    """A connection's input. With no deadline (between requests) a read waits read_timeout_s; with
    one (a request under way) only until it: a client that trickles a byte at a time still times out."""

    def __init__(self, connection: socket.socket, timeout_s: float):
        self.connection, self.timeout_s = connection, timeout_s
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout_s = self.timeout_s if self.deadline is None else self.deadline - time.monotonic()
        if timeout_s <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.connection.settimeout(timeout_s)
        try:
            return self.connection.recv_into(buffer)
        finally:
            self.connection.settimeout(self.timeout_s)  # writes: a client that stops reading is dropped


class JSONHandler(BaseHTTPRequestHandler):
    """One connection: requests read under the service's limits, answered with JSON (_json, _error)
    or server-sent events (_start_events, _event, _end_events). Subclasses add do_GET / do_POST."""

    protocol_version = "HTTP/1.1"
    server_version = "trimode-openai"
    server: _Server

    def setup(self) -> None:
        self.connection = self.request
        self._timeout_s = self.server.service.read_timeout_s
        self.connection.settimeout(self._timeout_s)
        # Each response is one write (the buffer below) and nothing waits for an ACK: with Nagle's
        # algorithm a body written after its headers waited out the client's delayed ACK (~40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._reader = _Reader(self.connection, self._timeout_s)
        self.rfile = self._input = io.BufferedReader(self._reader)
        self.wfile = self.connection.makefile("wb", 2**16)
        self._has_responded = self._is_unread = False

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._is_unread:
                self._linger()

    def _linger(self) -> None:
        """Closed with the client's input unread, the socket would send a reset, which can discard
        our error response before the client reads it: send end-of-file, read what comes, then close."""
        deadline = time.monotonic() + LINGER_S
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(65536):
                    break
        except OSError:
            pass

    def handle_one_request(self) -> None:
        """One request: the stdlib's, with its timeouts answered 408, draining answered 503, and the
        requests under way counted (num_in_flight)."""
        self.close_connection = True
        self._reader.deadline = None
        try:
            if not self._input.peek(1):
                return  # the client closed, or stop() did
        except OSError:
            return  # idle past read_timeout_s (or reset): closed without a word, as keep-alive timeouts are
        self._reader.deadline = time.monotonic() + self._timeout_s
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.1"  # until parse_request
        self._has_responded = False
        service = self.server.service
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                return self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            if not self.parse_request():
                return  # answered by send_error
            method = getattr(self, f"do_{self.command}", None)
            if method is None:
                return self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"unsupported method {self.command!r}")
            has_body = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
            if self.command != "POST" and has_body:
                self.close_connection = self._is_unread = True  # a body we do not read is no next request
            if service.is_draining:
                self.close_connection = True
                message = "the server is shutting down (draining): retry on another replica"
                return self._error(APIError(503, message, kind="server_error", code="draining"))
            service.count_in_flight(1)
            try:
                method()
            finally:
                service.count_in_flight(-1)
            self.wfile.flush()
        except TimeoutError:  # reading the request (a write that timed out has a response under way)
            if not self._has_responded:
                self.send_error(HTTPStatus.REQUEST_TIMEOUT, f"the request did not arrive within {self._timeout_s:g} s")
            self.close_connection = True
        except ConnectionError:  # the client is gone (mid-stream too: the handler cleaned up on its way out)
            self.close_connection = True
        except Exception:  # ours or Triton's fault, not the client's: its traceback, and a 500
            self.server.handle_error(self.request, self.client_address)
            if not self._has_responded:
                self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the server's log")
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        """100 Continue only for a body we will read: otherwise do_POST's answer (411, 413, 503) comes first."""
        if self.command == "POST" and not self.server.service.is_draining:
            try:
                self._body_length()
            except APIError:
                return True
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
            self.wfile.flush()
        return True

    def send_response(self, code, message=None) -> None:
        self._has_responded = True
        super().send_response(code, message)

    def send_error(self, code, message=None, explain=None) -> None:
        """The stdlib's protocol errors (bad request line, headers too large, ...) in OpenAI's shape."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # parse_request's default: a garbled line still gets a status line
            self.request_version = "HTTP/1.1"
        status = HTTPStatus(code)
        text = f"{message or status.phrase}{f' ({explain})' if explain else ''}"
        self._error(APIError(status, text, kind="invalid_request_error" if status < 500 else "server_error"))

    def log_message(self, format, *args) -> None:  # no access log (tritonserver logs requests itself)
        pass

    def _body_length(self) -> int:
        """The body's Content-Length, checked before a byte of it is read (the connection closes past an error)."""
        lengths = [v.strip() for v in self.headers.get_all("Content-Length", [])]
        if not lengths or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # the body's end is unknown
            raise APIError(411, "a JSON body with a Content-Length header is required (no chunked transfer encoding)")
        if len(set(lengths)) > 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            self.close_connection = True
            raise APIError(400, f"Content-Length: expected one byte count, got {', '.join(lengths)[:80]!r}")
        limit = self.server.service.max_body_bytes
        if len(lengths[0]) > len(str(limit)) or int(lengths[0]) > limit:
            self.close_connection = True
            raise APIError(
                413, f"the body of {lengths[0][:40]} bytes is larger than this server takes ({limit}, max_body_bytes)"
            )
        return int(lengths[0])

    def _body(self):
        """The request's JSON body, decoded (APIError: missing, too large, cut short, not JSON)."""
        length = self._body_length()
        data = self.rfile.read(length)  # a client too slow for read_timeout_s: TimeoutError, a 408
        if len(data) < length:
            self.close_connection = True
            raise APIError(400, f"the body ended after {len(data)} of its {length} bytes")
        try:
            return json.loads(data)
        except RecursionError:
            raise APIError(400, "the body is not valid JSON (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None

    def _start_events(self) -> None:
        """A 200 whose body is server-sent events (chunked): _event each, then _end_events."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, obj: dict) -> None:
        self._send_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _end_events(self) -> None:
        self._send_chunk(b"data: [DONE]\n\n")
        self._send_chunk(b"")

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        """A whole response, written at once with its headers (wfile is flushed after the request)."""
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError) -> None:
        self._is_unread = self._is_unread or self.close_connection  # closing early: what the client sent is unread
        self._json(e.status, e.body())
