"""OpenAI request bodies -> the ensembles' TensorRT-LLM tensors, and our responses -> OpenAI's JSON.

No I/O here (openai_api.py serves it): what the OpenAI API asks that we cannot honour (n > 1,
echo, tools, ...) is a 400 naming the parameter, never silently ignored; values the
engine itself checks (top_p, penalties, multi-token stop words, max_tokens past the engine's
max_seq_len) pass through and come back as its error. Differences from OpenAI's defaults:
temperature left out is the engine's 0 (greedy), not 1; a chat request without max_tokens gets
the room left in the engine (OpenAI's: unbounded). What json.loads takes but nothing after it
should meet is refused first: nesting past MAX_JSON_DEPTH, and strings that are not Unicode text (a
lone UTF-16 surrogate such as "\\ud800", which no encoder, tokenizer or gRPC call accepts).

Log probs as OpenAI shows them: completions' `logprobs: k` gives each token's log prob and (k > 0)
its k most likely alternatives; chat's `logprobs: true` the first, `top_logprobs: k` also the
second. Each is the engine's (trimode/decoding/logprobs.py), with its token as openai_api.py's
TokenTexts renders the ids the ensembles return; a stream's chunks carry those of their own tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from trimode.errors import TrimodeError

MAX_JSON_DEPTH = 32  # nesting levels of a request body (OpenAI's deepest is ~4: messages[0].content[0].text)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH_REASONS = {"eos": "stop", "length": "length"}  # ours -> OpenAI's (a stop word ends as eos)
# the engine's MAX_LOGPROBS (trimode.decoding.logprobs, not imported: it imports torch); OpenAI's is 5 for completions
MAX_TOP_LOGPROBS = 20
# parameter -> its values that ask for nothing; another value is a 400
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "prompt_logprobs": (None, 0),
}
_WHY = {"n": "one choice per request; send several requests (the engine batches them)"}


class APIError(TrimodeError):
    """An OpenAI-style error response: HTTP status, message, type, the parameter at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Call:
    """One OpenAI request, ready for the ensemble `model`."""

    model: str
    inputs: dict
    is_chat: bool
    is_stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none asked; k: each token's log prob and its k most likely alternatives
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


def parse_request(
    body, is_chat: bool, models: list[str], render_chat: Callable[[object], str], room_left: Callable[[str], int]
) -> Call:
    """body: the decoded JSON. render_chat: messages -> prompt text (the chat template, which may
    refuse with a TrimodeError). room_left: prompt -> the largest max_tokens the engine takes for it."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_json(body)
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "model: required, one of " + ", ".join(models), "model")
    if model not in models:
        raise APIError(
            404, f"The model '{model}' does not exist; served: {', '.join(models)}", "model", "model_not_found"
        )
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name)
        if value not in neutral:
            raise APIError(400, f"{name}={value!r} is not supported: {_WHY.get(name, 'leave it out')}", name)
    format_ = body.get("response_format")
    if format_ not in (None, {"type": "text"}):
        raise APIError(400, 'response_format: only {"type": "text"} is supported', "response_format")
    try:
        prompt = render_chat(body.get("messages")) if is_chat else _prompt(body.get("prompt"))
    except TrimodeError as e:
        raise APIError(400, str(e), "messages" if is_chat else "prompt") from None
    inputs: dict = {"text_input": prompt}
    names = ("max_completion_tokens", "max_tokens")  # chat's newer name; clients send it to completions too
    name = next((n for n in names if body.get(n) is not None), names[-1])
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = max(1, room_left(prompt)) if is_chat else COMPLETION_MAX_TOKENS
    inputs["max_tokens"] = _integer(name, max_tokens, 1, 2**31 - 1)
    if body.get("temperature") is not None:
        inputs["temperature"] = _number("temperature", body["temperature"], 0.0, 2.0)
    if body.get("top_p") is not None:
        inputs["top_p"] = _number("top_p", body["top_p"], 0.0, 1.0)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            inputs[name] = _number(name, body[name], -2.0, 2.0)
    if body.get("seed") is not None:
        inputs["random_seed"] = _integer("seed", body["seed"], 0, 2**64 - 1)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(400, "stop: expected a string or a list of up to 4 non-empty strings", "stop")
    if stop:
        inputs["stop_words"] = stop
    if body.get("ignore_eos") is not None and _boolean("ignore_eos", body["ignore_eos"]):  # vLLM's, aiperf sends it
        inputs["end_id"] = -1
    for name, kind in (("block_length", int), ("threshold", float)):  # ours, as on the ensembles
        if body.get(name) is not None:
            inputs[name] = _integer(name, body[name], 1, 65536) if kind is int else _number(name, body[name], 0.0, 1.0)
    is_stream = _boolean("stream", body.get("stream", False))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or (options and not is_stream):
        raise APIError(400, "stream_options: an object, only with stream=true", "stream_options")
    include_usage = _boolean("stream_options.include_usage", options.get("include_usage", False))
    logprobs = _logprobs(body, is_chat)
    if logprobs is not None:
        inputs["return_log_probs"] = True
        if logprobs:
            inputs["num_top_log_probs"] = logprobs
    return Call(model, inputs, is_chat, is_stream, include_usage, logprobs)


def _logprobs(body: dict, is_chat: bool) -> int | None:
    """How many alternatives per token the request asks for (None: no log probs): completions'
    logprobs: k; chat's logprobs: true with top_logprobs: k (left out: 0)."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if not is_chat:
        if top is not None:
            raise APIError(400, "top_logprobs: a chat parameter; completions take logprobs: k", "top_logprobs")
        return None if logprobs is None else _integer("logprobs", logprobs, 0, MAX_TOP_LOGPROBS)
    if top is not None:
        top = _integer("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
    if not (logprobs is not None and _boolean("logprobs", logprobs)):
        if top:
            raise APIError(400, f"top_logprobs={top}: only with logprobs=true", "top_logprobs")
        return None
    return top or 0


def check_json(body) -> None:
    """A 400 naming the first value of body nested past MAX_JSON_DEPTH or holding a lone surrogate."""
    fault = _json_fault(body, MAX_JSON_DEPTH)
    if fault is not None:
        where, what = fault
        path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where[:6]).lstrip(".")
        path += "..." if len(where) > 6 else ""
        raise APIError(400, f"{path or 'the body'}: {what}", str(where[0]) if where else None)


def _json_fault(value, depth: int) -> tuple[list, str] | None:
    """(keys to the value, what is wrong with it), or None. Recursion is bounded by depth."""
    if isinstance(value, str):
        return None if _is_text(value) else ([], "a lone UTF-16 surrogate is not text; send UTF-8 text")
    if not isinstance(value, (dict, list)):
        return None
    if depth == 0:
        return [], f"nested deeper than {MAX_JSON_DEPTH} levels"
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(key, str) and not _is_text(key):
            return [key.encode("utf-8", "backslashreplace").decode()], "a key with a lone UTF-16 surrogate"
        fault = _json_fault(item, depth - 1) if isinstance(item, (str, dict, list)) else None
        if fault is not None:
            fault[0].insert(0, key)
            return fault
    return None


def _is_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise TrimodeError(
            "prompt: expected one string (a list of prompts or token ids is not supported; send one request per prompt)"
        )
    if not prompt:
        raise TrimodeError("prompt: the prompt is empty")
    return prompt


def _integer(name: str, value, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise APIError(400, f"{name}: expected an integer in [{low}, {high}], got {value!r}", name)
    return value


def _number(name: str, value, low: float, high: float) -> float:
    if type(value) not in (int, float) or not low <= value <= high:  # also refuses nan
        raise APIError(400, f"{name}: expected a number in [{low}, {high}], got {value!r}", name)
    return float(value)


def _boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise APIError(400, f"{name}: expected true or false, got {value!r}", name)
    return value


def usage(result: dict) -> dict:
    prompt, completion = int(result["num_input_tokens"]), int(result["num_output_tokens"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(ours: str) -> str | None:
    return FINISH_REASONS.get(ours, ours) if ours else None


def response(call: Call, text: str, result: dict, tokens: list[TokenLogProb] | None = None) -> dict:
    """The whole (non-streamed) answer; tokens: its log probs, when the call asks for them."""
    reason = finish_reason(result["finish_reason"])
    choice: dict[str, object] = {"index": 0, "logprobs": logprobs_json(call, tokens), "finish_reason": reason}
    choice |= {"message": {"role": "assistant", "content": text}} if call.is_chat else {"text": text}
    return {**_head(call, False), "choices": [choice], "usage": usage(result)}


def chunk(
    call: Call, text: str | None, reason: str = "", result: dict | None = None, tokens: list[TokenLogProb] | None = None
) -> dict:
    """One streamed event: text (None: the chat's opening role-only delta) and the log probs of its
    tokens, or the usage-only last one."""
    head = _head(call, True)
    if result is not None:
        return {**head, "choices": [], "usage": usage(result)}
    choice: dict[str, object] = {
        "index": 0,
        "logprobs": logprobs_json(call, tokens),
        "finish_reason": finish_reason(reason),
    }
    if call.is_chat:
        choice["delta"] = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
    else:
        choice["text"] = text or ""
    return {**head, "choices": [choice]} | ({"usage": None} if call.include_usage else {})


class Scored(NamedTuple):
    """A token as OpenAI shows it (TokenTexts) with its log prob."""

    token: str
    utf8: list[int]
    logprob: float


class TokenLogProb(NamedTuple):
    """An emitted token, where its text starts in the completion's, and the most likely tokens at its
    position (most likely first)."""

    emitted: Scored
    text_offset: int
    top: list[Scored]


def logprobs_json(call: Call, tokens: list[TokenLogProb] | None) -> dict | None:
    """A choice's logprobs: completions' four parallel lists, or chat's content list."""
    if call.logprobs is None or tokens is None:
        return None
    if call.is_chat:
        return {"content": [{**_scored(t.emitted), "top_logprobs": [_scored(s) for s in t.top]} for t in tokens]}
    return {
        "tokens": [t.emitted.token for t in tokens],
        "token_logprobs": [t.emitted.logprob for t in tokens],
        "top_logprobs": [_by_token(t.top) for t in tokens] if call.logprobs else None,
        "text_offset": [t.text_offset for t in tokens],
    }


def _scored(s: Scored) -> dict:
    return {"token": s.token, "logprob": s.logprob, "bytes": s.utf8}


def _by_token(top: list[Scored]) -> dict[str, float]:
    """Completions' {token: log prob}, most likely first; of two tokens with the same text, the likelier."""
    out: dict[str, float] = {}
    for s in top:
        out.setdefault(s.token, s.logprob)
    return out


def _head(call: Call, is_stream: bool) -> dict:
    kind = ("chat.completion.chunk" if is_stream else "chat.completion") if call.is_chat else "text_completion"
    prefix = "chatcmpl-" if call.is_chat else "cmpl-"
    return {"id": prefix + call.id, "object": kind, "created": int(time.time()), "model": call.model}


def models_list(models: list[str], created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": "trimode"} for m in models],
    }
