"""An OpenAI-compatible front end over a running `trimode serve`: /v1/completions and
/v1/chat/completions (whole or streamed as server-sent events) and /v1/models, one model per mode
(the repository's ensemble names). Each request is one call of its ensemble through tritonclient
(gRPC), so any OpenAI client, or NVIDIA's aiperf, can use a deployment unchanged.

Served by openai_http.py's hardened HTTP/1.1 server (threads, keep-alive, chunked SSE, limits
against hostile clients), which keeps the dependencies to what serving already needs; the engine
batches the concurrent requests. `trimode serve --openai-port` runs it in-process next to
tritonserver.

Log probs (openai_params.py: what is asked, and its JSON) come from the ensembles as token ids and
values; TokenTexts renders each id as OpenAI shows a token, from the served tokenizer.
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from trimode.chat import ChatTemplate, NoChatTemplateError, load_chat_template
from trimode.config import ModelSpec
from trimode.tokenizer import Tokenizer
from trimode.triton_repo import client
from trimode.triton_repo.openai_http import HTTPService, JSONHandler
from trimode.triton_repo.openai_params import (
    APIError,
    Call,
    Scored,
    TokenLogProb,
    chunk,
    models_list,
    parse_request,
    response,
)
from trimode.triton_repo.server import ServerError
from trimode.triton_repo.writer import read_repo_manifest

_ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> is_chat
IMPOSSIBLE_LOGPROB = -9999.0  # OpenAI's value for a token of probability 0 (JSON has no -Infinity)


class OpenAIFrontend(HTTPService):
    """`OpenAIFrontend(repo, "127.0.0.1:8001", port=9000).start()`; `stop()` ends it, and cancels a
    stream in flight (its client.stream_grpc closes): no request of ours is left running when
    tritonserver stops next. The chat
    template and tokenizer are the served engine's checkpoint's (chat_template_path: a Jinja file
    that replaces the template). max_body_bytes: the largest request body (413 past it);
    read_timeout_s: how long a request may take to arrive whole, and an idle connection stays open;
    max_connections: the open connections served at once (a 503 past it)."""

    def __init__(
        self,
        repo_dir: Path,
        triton_url: str,
        host: str = "127.0.0.1",
        port: int = 9000,
        chat_template_path: Path | None = None,
        *,
        max_body_bytes: int = 4 * 2**20,
        read_timeout_s: float = 30.0,
        max_connections: int = 256,
    ):
        super().__init__(
            _Handler,
            host,
            port,
            max_body_bytes=max_body_bytes,
            read_timeout_s=read_timeout_s,
            max_connections=max_connections,
        )
        manifest = read_repo_manifest(repo_dir)
        self.triton_url = triton_url
        self.models = list(manifest["ensembles"].values())
        self.created = int(time.time())
        engine = manifest["engine"]
        self._max_tokens_room = engine["max_seq_len"] - max(engine["block_lengths"])
        checkpoint_dir = Path(engine["path"]) / "checkpoint"
        self._tokenizer = Tokenizer(checkpoint_dir, ModelSpec.from_file(checkpoint_dir / "config.json"))
        self.token_texts = TokenTexts(self._tokenizer.decode, self._tokenizer.vocab)
        self.chat_template: ChatTemplate | None
        self._no_template: str | None
        try:
            self.chat_template, self._no_template = load_chat_template(checkpoint_dir, chat_template_path), None
        except NoChatTemplateError as e:  # serve completions; answer chat requests with this
            self.chat_template, self._no_template = None, f"{e} (or start the server with --chat-template FILE)"

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
        try:
            return super().open()
        except OSError as e:
            raise ServerError(
                f"--openai-port {self.port}: cannot listen on {self.host}:{self.port} ({e.strerror}); choose another port"
            ) from None


class TokenTexts:
    """Token ids -> OpenAI's token strings and UTF-8 bytes, from the served tokenizer (decode: ids ->
    text without special tokens; vocab: the tokenizer's {token: id}).

    A token is shown as its text. One that is part of a character (decoded alone it is U+FFFD)
    gets its own bytes, read from its vocabulary entry (a byte-level BPE's alphabet or
    SentencePiece's <0xNN>), and OpenAI's "bytes:\\xe2\\x80" as its text; a special token (no
    text) its name and no share of the completion's text."""

    def __init__(self, decode: Callable[[list[int]], str], vocab: Callable[[], dict[str, int]]):
        self._decode, self._vocab = decode, vocab
        self._names: dict[int, str] | None = None
        self._cache: dict[int, tuple[str, list[int], bool]] = {}

    def piece(self, token_id: int) -> tuple[str, list[int], bool]:
        """(the token's string, its bytes, whether it is text of the completion)."""
        if token_id not in self._cache:
            if len(self._cache) > 2**16:
                self._cache.clear()
            self._cache[token_id] = self._piece(token_id)
        return self._cache[token_id]

    def _piece(self, token_id: int) -> tuple[str, list[int], bool]:
        text = self._decode([token_id])
        if not text or "\ufffd" in text:
            if self._names is None:
                self._names = {i: name for name, i in self._vocab().items()}
            name = self._names.get(token_id, "")
            if not text:  # a special token (or an id past the tokenizer's)
                return name, list(name.encode()), False
            data = _vocab_bytes(name) or text.encode()
            try:
                text = data.decode()
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in data), list(data), True
        return text, list(text.encode()), True


class RequestLogProbs:
    """A request's log probs, response by response: `of(result)` (client.py's result) -> its tokens.
    Text offsets run on across a stream's responses. A token that holds part of a character starts
    where the character does; bytes of a character that the next token does not go on with are one
    U+FFFD in the text (as the tokenizer decodes them), which that token starts after."""

    def __init__(self, texts: TokenTexts):
        self._texts = texts
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._num_chars = 0  # of the completion's text so far

    def of(self, result: dict) -> list[TokenLogProb]:
        if result.get("token_ids") is None:
            message = "the served ensembles return no output_token_ids: write the repository again (`trimode repo`)"
            raise APIError(500, message, kind="server_error")
        out = []
        for token_id, value, top in zip(result["token_ids"], result["log_probs"], result["top_log_probs"], strict=True):
            token, utf8, is_text = self._texts.piece(token_id)
            alternatives = [Scored(*self._texts.piece(t)[:2], _finite(v)) for t, v in top]
            pending = self._utf8.getstate()[0]  # the first bytes of a character, from earlier tokens
            is_after = bool(is_text and pending and utf8 and not _continues(pending, utf8[0]))
            out.append(TokenLogProb(Scored(token, utf8, _finite(value)), self._num_chars + is_after, alternatives))
            if is_text:
                self._num_chars += len(self._utf8.decode(bytes(utf8)))
        return out


def _continues(pending: bytes, byte: int) -> bool:
    """Whether byte goes on with the character whose first bytes are pending."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(pending + bytes([byte]))
    except UnicodeDecodeError:
        return False
    return True


def _finite(logprob: float) -> float:
    return logprob if logprob >= IMPOSSIBLE_LOGPROB else IMPOSSIBLE_LOGPROB  # -inf (and nan): OpenAI's -9999


def _vocab_bytes(name: str) -> bytes | None:
    """The bytes a vocabulary entry stands for, where the tokenizer writes bytes as characters."""
    if match := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", name):
        return bytes([int(match[1], 16)])
    if name and all(c in _BYTE_LEVEL for c in name):
        return bytes(_BYTE_LEVEL[c] for c in name)
    return None


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (tokenizers' ByteLevel): the character each byte is written as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_LEVEL = _byte_level_alphabet()


def _remote_error(e: client.RemoteError) -> APIError:
    """The engine refuses bad input with a message naming it (400); busy, draining or unreachable: 503, retry."""
    message = str(e)
    words = ("overloaded", "draining", "unavailable", "failed to connect")
    if isinstance(e, client.NoAnswer) or any(w in message.lower() for w in words):
        return APIError(503, message, kind="server_error", code="unavailable")
    return APIError(400, message)


class _Handler(JSONHandler):
    """The routes: GET /v1/models, /v1/models/ID, /health; POST /v1/completions, /v1/chat/completions."""

    @property
    def frontend(self) -> OpenAIFrontend:
        frontend = self.server.service
        assert isinstance(frontend, OpenAIFrontend)
        return frontend

    def do_GET(self) -> None:
        frontend, path = self.frontend, self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, models_list(frontend.models, frontend.created))
        elif path.startswith("/v1/models/"):
            model = unquote(path[len("/v1/models/") :])
            if model in frontend.models:
                self._json(200, models_list([model], frontend.created)["data"][0])
            else:
                message = f"The model '{model}' does not exist; served: {', '.join(frontend.models)}"
                self._error(APIError(404, message, "model", "model_not_found"))
        elif path == "/health":
            self._json(200, {})
        else:
            self._error(
                APIError(404, f"{path}: no such endpoint (GET /v1/models, /v1/models/ID, /health)", code="not_found")
            )

    def do_POST(self) -> None:
        frontend, path = self.frontend, self.path.split("?")[0].rstrip("/")
        try:
            body = self._body()
            if path not in _ROUTES:
                raise APIError(404, f"{path}: no such endpoint (POST {', '.join(_ROUTES)})", code="not_found")
            call = parse_request(body, _ROUTES[path], frontend.models, frontend.render_chat, frontend.room_left)
            logprobs = None if call.logprobs is None else RequestLogProbs(frontend.token_texts)
            if call.is_stream:
                self._stream(call, logprobs)
            else:
                result = client.infer(frontend.triton_url, call.model, call.inputs)
                self._json(200, response(call, result["text"], result, logprobs.of(result) if logprobs else None))
        except APIError as e:
            self._error(e)
        except client.RemoteError as e:
            self._error(_remote_error(e))

    def _stream(self, call: Call, logprobs: RequestLogProbs | None) -> None:
        """Server-sent events, one per response of the ensemble's stream that has text, tokens or the
        finish reason. The first response is awaited before the 200: an input the engine refuses gets a
        plain 400, as a whole request does."""
        stream = client.stream_grpc(self.frontend.triton_url, call.model, call.inputs)
        try:
            first = next(stream)
            self._start_events()
            if call.is_chat:
                self._event(chunk(call, None))
            last = first
            try:
                for result in _chain(first, stream):
                    last = result
                    tokens = logprobs.of(result) if logprobs else None
                    if result["text"] or result["finish_reason"] or tokens:
                        self._event(chunk(call, result["text"], result["finish_reason"], tokens=tokens))
                if call.include_usage:
                    self._event(chunk(call, None, result=last))
            except client.RemoteError as e:  # mid-stream: the status is sent, so an error event
                self._event(_remote_error(e).body())
            except APIError as e:
                self._event(e.body())
            self._end_events()
        finally:
            stream.close()  # a client gone mid-stream cancels its request (client.stream_grpc)


def _chain(first: dict, rest):
    yield first
    yield from rest
