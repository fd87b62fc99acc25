"""An OpenAI-compatible front end over a running `trimode serve`: /v1/completions and
/v1/chat/completions (whole or streamed as server-sent events) and /v1/models, one model per mode
(the repository's ensemble names). Each request is one call of its ensemble through tritonclient
(gRPC), so any OpenAI client, or NVIDIA's aiperf, can use a deployment unchanged.

A stdlib ThreadingHTTPServer (one thread per connection, HTTP/1.1 keep-alive, chunked SSE) keeps
the dependencies to what serving already needs; the engine batches the concurrent requests.
`trimode serve --openai-port` runs it in-process next to tritonserver.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from trimode.chat import ChatTemplate, NoChatTemplateError, load_chat_template
from trimode.config import ModelSpec
from trimode.tokenizer import Tokenizer
from trimode.triton_repo import client
from trimode.triton_repo.openai_params import APIError, Call, chunk, models_list, parse_request, response
from trimode.triton_repo.server import ServerError
from trimode.triton_repo.writer import read_repo_manifest

_ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> is_chat


class OpenAIFrontend:
    """`OpenAIFrontend(repo, "127.0.0.1:8001", port=9000).start()`; `stop()` ends it. The chat
    template and tokenizer are the served engine's checkpoint's (chat_template_path: a Jinja file
    that replaces the template)."""

    def __init__(
        self,
        repo_dir: Path,
        triton_url: str,
        host: str = "127.0.0.1",
        port: int = 9000,
        chat_template_path: Path | None = None,
    ):
        manifest = read_repo_manifest(repo_dir)
        self.triton_url, self.host, self.port = triton_url, host, port
        self.models = list(manifest["ensembles"].values())
        self.created = int(time.time())
        engine = manifest["engine"]
        self._max_tokens_room = engine["max_seq_len"] - max(engine["block_lengths"])
        checkpoint_dir = Path(engine["path"]) / "checkpoint"
        self._tokenizer = Tokenizer(checkpoint_dir, ModelSpec.from_file(checkpoint_dir / "config.json"))
        self.chat_template: ChatTemplate | None
        self._no_template: str | None
        try:
            self.chat_template, self._no_template = load_chat_template(checkpoint_dir, chat_template_path), None
        except NoChatTemplateError as e:  # serve completions; answer chat requests with this
            self.chat_template, self._no_template = None, f"{e} (or start the server with --chat-template FILE)"
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def render_chat(self, messages) -> str:
        if self.chat_template is None:
            raise NoChatTemplateError(self._no_template)
        return self.chat_template.render(messages)

    def room_left(self, prompt: str) -> int:
        """The largest max_tokens the engine takes after this prompt (and its BOS)."""
        return self._max_tokens_room - len(self._tokenizer.encode(prompt))

    def open(self) -> "OpenAIFrontend":
        """Listen now (requests wait in the backlog until start): a taken port fails before tritonserver starts."""
        if self._httpd is None:
            server_class = _Server6 if ":" in self.host else _Server
            try:
                self._httpd = server_class((self.host, self.port), _Handler)
            except OSError as e:
                raise ServerError(
                    f"--openai-port {self.port}: cannot listen on {self.host}:{self.port} "
                    f"({e.strerror}); choose another port"
                ) from None
            self._httpd.frontend = self
        return self

    def start(self) -> "OpenAIFrontend":
        self.open()
        assert self._httpd is not None  # open() made it
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="openai-frontend", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every open connection and wait for their threads: an idle keep-alive
        connection ends at once, a stream in flight cancels its request, a whole answer in flight is
        still sent. So no request of ours is left running when tritonserver stops next."""
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join()
            self._httpd.close_connections()
            self._httpd.server_close()  # joins the connections' threads
            self._httpd = self._thread = None

    def __enter__(self) -> "OpenAIFrontend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # stop() ends the connections, then joins their threads
    frontend: OpenAIFrontend

    def __init__(self, *args, **kwargs):
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """A handler waiting for the next request on a keep-alive connection reads end-of-file and
        returns; one streaming an answer fails its next write."""
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the client


class _Server6(_Server):
    address_family = socket.AF_INET6


def _remote_error(e: client.RemoteError) -> APIError:
    """The engine refuses bad input with a message naming it (400); busy or unreachable: 503, retry."""
    message = str(e)
    if "overloaded" in message or "UNAVAILABLE" in message or "failed to connect" in message:
        return APIError(503, message, kind="server_error", code="unavailable")
    return APIError(400, message)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "trimode-openai"
    timeout = 300  # an idle keep-alive connection is closed after this
    server: _Server

    def log_message(self, format, *args) -> None:  # no access log (tritonserver logs requests itself)
        pass

    def do_GET(self) -> None:
        frontend, path = self.server.frontend, self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, models_list(frontend.models, frontend.created))
        elif path.startswith("/v1/models/"):
            model = unquote(path[len("/v1/models/") :])
            if model in frontend.models:
                self._json(200, models_list([model], frontend.created)["data"][0])
            else:
                self._error(
                    APIError(
                        404,
                        f"The model '{model}' does not exist; served: {', '.join(frontend.models)}",
                        "model",
                        "model_not_found",
                    )
                )
        elif path == "/health":
            self._json(200, {})
        else:
            self._error(
                APIError(404, f"{path}: no such endpoint (GET /v1/models, /v1/models/ID, /health)", code="not_found")
            )

    def do_POST(self) -> None:
        frontend, path = self.server.frontend, self.path.split("?")[0].rstrip("/")
        try:
            body = self._body()
            if path not in _ROUTES:
                raise APIError(404, f"{path}: no such endpoint (POST {', '.join(_ROUTES)})", code="not_found")
            call = parse_request(body, _ROUTES[path], frontend.models, frontend.render_chat, frontend.room_left)
            if call.is_stream:
                self._stream(call)
            else:
                result = client.infer(frontend.triton_url, call.model, call.inputs)
                self._json(200, response(call, result["text"], result))
        except APIError as e:
            self._error(e)
        except client.RemoteError as e:
            self._error(_remote_error(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # the body's end is unknown
            raise APIError(411, "a JSON body with a Content-Length header is required")
        data = self.rfile.read(int(length))
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None

    def _stream(self, call: Call) -> None:
        """Server-sent events, one per response of the ensemble's stream. The first response is awaited
        before the 200: an input the engine refuses gets a plain 400, as a whole request does."""
        stream = client.stream_grpc(self.server.frontend.triton_url, call.model, call.inputs)
        try:
            first = next(stream)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if call.is_chat:
                self._event(chunk(call, None))
            last = first
            try:
                for result in _chain(first, stream):
                    last = result
                    if result["text"] or result["finish_reason"]:
                        self._event(chunk(call, result["text"], result["finish_reason"]))
                if call.include_usage:
                    self._event(chunk(call, None, result=last))
            except client.RemoteError as e:  # mid-stream: the status is sent, so an error event
                self._event(_remote_error(e).body())
            self._send_chunk(b"data: [DONE]\n\n")
            self._send_chunk(b"")
        finally:
            stream.close()  # a client gone mid-stream cancels its request (client.stream_grpc)

    def _event(self, obj: dict) -> None:
        self._send_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError) -> None:
        self._json(e.status, e.body())


def _chain(first: dict, rest):
    yield first
    yield from rest
