"""OpenAI request bodies -> ensemble tensors, and results -> OpenAI's JSON, without a server."""

from __future__ import annotations

import pytest

from trimode.errors import InputError
from trimode.triton_repo.openai_params import (
    MAX_JSON_DEPTH,
    APIError,
    Call,
    Scored,
    TokenLogProb,
    check_json,
    chunk,
    logprobs_json,
    models_list,
    parse_request,
    response,
)

MODELS = ["nld_ar", "nld_diffusion", "nld_self_spec"]


def render(messages) -> str:
    if messages == "refuse":
        raise InputError("messages: refused")
    return "|".join(m["content"] for m in messages) + ">"


def parse(body: dict, is_chat: bool = False, room: int = 50) -> Call:
    return parse_request(body, is_chat, MODELS, render, lambda prompt: room - len(prompt))


@pytest.mark.parametrize(
    "body, inputs",
    [
        ({"prompt": "def f"}, {"text_input": "def f", "max_tokens": 16}),  # OpenAI's completions default
        ({"prompt": ["def f"], "max_tokens": 5}, {"text_input": "def f", "max_tokens": 5}),
        ({"prompt": "p", "max_completion_tokens": 6}, {"text_input": "p", "max_tokens": 6}),
        (
            {"prompt": "p", "temperature": 0, "seed": 7, "top_p": 1},
            {"text_input": "p", "max_tokens": 16, "temperature": 0.0, "random_seed": 7, "top_p": 1.0},
        ),
        ({"prompt": "p", "stop": "\n"}, {"text_input": "p", "max_tokens": 16, "stop_words": ["\n"]}),
        (
            {"prompt": "p", "stop": ["a", "b"], "stop_words": "ignored"},
            {"text_input": "p", "max_tokens": 16, "stop_words": ["a", "b"]},
        ),
        ({"prompt": "p", "stop": []}, {"text_input": "p", "max_tokens": 16}),
        ({"prompt": "p", "ignore_eos": False}, {"text_input": "p", "max_tokens": 16}),
        (
            {"prompt": "p", "ignore_eos": True, "block_length": 4, "threshold": 0.5},
            {"text_input": "p", "max_tokens": 16, "end_id": -1, "block_length": 4, "threshold": 0.5},
        ),
        (
            {"prompt": "p", "presence_penalty": 0, "n": 1, "logprobs": None, "echo": False, "user": "u"},
            {"text_input": "p", "max_tokens": 16, "presence_penalty": 0.0},
        ),
        ({"prompt": "p", "seed": 2**64 - 1}, {"text_input": "p", "max_tokens": 16, "random_seed": 2**64 - 1}),
        ({"prompt": "p", "logprobs": 0}, {"text_input": "p", "max_tokens": 16, "return_log_probs": True}),
        (
            {"prompt": "p", "logprobs": 20},
            {"text_input": "p", "max_tokens": 16, "return_log_probs": True, "num_top_log_probs": 20},
        ),
    ],
)
def test_completion_mapping(body, inputs):
    call = parse({"model": "nld_ar", **body})
    assert call.model == "nld_ar" and call.inputs == inputs and not call.is_chat and not call.is_stream


@pytest.mark.parametrize(
    "body, max_tokens",
    [
        ({}, 50 - len("hi>")),  # the engine's room after the prompt
        ({"max_tokens": 9}, 9),
        ({"max_completion_tokens": 7, "max_tokens": 9}, 7),  # the newer name wins
        ({"max_completion_tokens": None, "max_tokens": 9}, 9),
    ],
)
def test_chat_mapping(body, max_tokens):
    call = parse({"model": "nld_self_spec", "messages": [{"role": "user", "content": "hi"}], **body}, is_chat=True)
    assert call.inputs == {"text_input": "hi>", "max_tokens": max_tokens} and call.is_chat


@pytest.mark.parametrize(
    "body, is_chat, logprobs",
    [
        ({}, False, None),
        ({"logprobs": None}, False, None),
        ({"logprobs": 0}, False, 0),
        ({"logprobs": 5}, False, 5),
        ({}, True, None),
        ({"logprobs": False}, True, None),
        ({"logprobs": False, "top_logprobs": 0}, True, None),
        ({"top_logprobs": 0}, True, None),
        ({"logprobs": True}, True, 0),
        ({"logprobs": True, "top_logprobs": None}, True, 0),
        ({"logprobs": True, "top_logprobs": 20}, True, 20),
    ],
)
def test_logprobs_asked(body, is_chat, logprobs):
    """completions' logprobs: k; chat's logprobs: true with top_logprobs: k."""
    messages = {"messages": [{"role": "user", "content": "hi"}]} if is_chat else {"prompt": "p"}
    call = parse({"model": "nld_ar", **messages, **body}, is_chat=is_chat)
    assert call.logprobs == logprobs
    assert call.inputs.get("return_log_probs") is (None if logprobs is None else True)
    assert call.inputs.get("num_top_log_probs") == (logprobs or None)


def test_chat_with_no_room_left_still_asks_for_one_token():
    """The engine then says why the prompt does not fit (its error names max_seq_len)."""
    call = parse({"model": "nld_ar", "messages": [{"role": "user", "content": "x" * 80}]}, is_chat=True)
    assert call.inputs["max_tokens"] == 1


def test_stream_options():
    call = parse({"model": "nld_ar", "prompt": "p", "stream": True, "stream_options": {"include_usage": True}})
    assert call.is_stream and call.include_usage
    assert not parse({"model": "nld_ar", "prompt": "p", "stream": True}).include_usage


@pytest.mark.parametrize(
    "body, status, param, message",
    [
        ({"prompt": "p"}, 400, "model", "model: required, one of nld_ar, nld_diffusion, nld_self_spec"),
        ({"model": "ar", "prompt": "p"}, 404, "model", "The model 'ar' does not exist"),
        ({"model": "nld_ar", "prompt": "p", "n": 2}, 400, "n", "n=2 is not supported: one choice per request"),
        ({"model": "nld_ar", "prompt": "p", "best_of": 3}, 400, "best_of", "best_of=3 is not supported"),
        ({"model": "nld_ar", "prompt": "p", "echo": True}, 400, "echo", "echo=True is not supported"),
        (
            {"model": "nld_ar", "prompt": "p", "logprobs": -1},
            400,
            "logprobs",
            "logprobs: expected an integer in [0, 20]",
        ),
        ({"model": "nld_ar", "prompt": "p", "logprobs": 21}, 400, "logprobs", "in [0, 20], got 21"),
        ({"model": "nld_ar", "prompt": "p", "logprobs": True}, 400, "logprobs", "got True"),
        ({"model": "nld_ar", "prompt": "p", "logprobs": "2"}, 400, "logprobs", "got '2'"),
        ({"model": "nld_ar", "prompt": "p", "top_logprobs": 2}, 400, "top_logprobs", "a chat parameter"),
        ({"model": "nld_ar", "prompt": "p", "prompt_logprobs": 1}, 400, "prompt_logprobs", "prompt_logprobs=1"),
        ({"model": "nld_ar", "prompt": "p", "logit_bias": {"5": 1}}, 400, "logit_bias", "logit_bias="),
        ({"model": "nld_ar", "prompt": "p", "suffix": "x"}, 400, "suffix", "suffix='x'"),
        (
            {"model": "nld_ar", "prompt": "p", "response_format": {"type": "json_object"}},
            400,
            "response_format",
            'only {"type": "text"}',
        ),
        ({"model": "nld_ar", "prompt": None}, 400, "prompt", "prompt: expected one string"),
        ({"model": "nld_ar", "prompt": ["a", "b"]}, 400, "prompt", "a list of prompts"),
        ({"model": "nld_ar", "prompt": [[1, 2]]}, 400, "prompt", "token ids is not supported"),
        ({"model": "nld_ar", "prompt": ""}, 400, "prompt", "the prompt is empty"),
        ({"model": "nld_ar", "prompt": "p", "max_tokens": 0}, 400, "max_tokens", "expected an integer in [1, "),
        ({"model": "nld_ar", "prompt": "p", "max_tokens": 2.5}, 400, "max_tokens", "got 2.5"),
        ({"model": "nld_ar", "prompt": "p", "max_tokens": True}, 400, "max_tokens", "got True"),
        ({"model": "nld_ar", "prompt": "p", "max_tokens": 2**31}, 400, "max_tokens", "got 2147483648"),
        ({"model": "nld_ar", "prompt": "p", "temperature": -0.1}, 400, "temperature", "in [0.0, 2.0], got -0.1"),
        ({"model": "nld_ar", "prompt": "p", "temperature": "hot"}, 400, "temperature", "got 'hot'"),
        ({"model": "nld_ar", "prompt": "p", "temperature": float("nan")}, 400, "temperature", "got nan"),
        ({"model": "nld_ar", "prompt": "p", "top_p": 1.5}, 400, "top_p", "top_p: expected a number in [0.0, 1.0]"),
        ({"model": "nld_ar", "prompt": "p", "seed": -1}, 400, "seed", "seed: expected an integer in [0, "),
        ({"model": "nld_ar", "prompt": "p", "stop": 5}, 400, "stop", "stop: expected a string or a list"),
        ({"model": "nld_ar", "prompt": "p", "stop": [""]}, 400, "stop", "non-empty strings"),
        ({"model": "nld_ar", "prompt": "p", "stream": "yes"}, 400, "stream", "stream: expected true or false"),
        ({"model": "nld_ar", "prompt": "p", "ignore_eos": "yes"}, 400, "ignore_eos", "expected true or false"),
        (
            {"model": "nld_ar", "prompt": "p", "stream_options": {"include_usage": True}},
            400,
            "stream_options",
            "only with stream=true",
        ),
        ({"model": "nld_ar", "prompt": "p", "block_length": 0}, 400, "block_length", "block_length: expected an"),
        ({"model": "nld_ar", "prompt": "p", "threshold": 2}, 400, "threshold", "threshold: expected a number in"),
    ],
)
def test_bad_completion_requests(body, status, param, message):
    with pytest.raises(APIError) as e:
        parse(body)
    assert (e.value.status, e.value.param) == (status, param)
    assert message in str(e.value)
    error = e.value.body()["error"]  # OpenAI's error object
    assert set(error) == {"message", "type", "param", "code"} and error["message"] == str(e.value)
    assert error["code"] == ("model_not_found" if status == 404 else None)


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"messages": "refuse"}, "messages", "messages: refused"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "tools="),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, "logprobs", "logprobs: expected true or"),
        (
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            "top_logprobs: expected an integer in [0, 20], got 21",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": -1},
            "top_logprobs",
            "got -1",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
            "only with logprobs=true",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "logprobs": False, "top_logprobs": 1},
            "top_logprobs",
            "top_logprobs=1: only with logprobs=true",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -2},
            "max_completion_tokens",
            "max_completion_tokens: expected an integer",
        ),
    ],
)
def test_bad_chat_requests(body, param, message):
    with pytest.raises(APIError) as e:
        parse({"model": "nld_ar", **body}, is_chat=True)
    assert e.value.status == 400 and e.value.param == param and message in str(e.value)


def nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"prompt": "a\ud800"}, "prompt", "prompt: a lone UTF-16 surrogate is not text"),
        ({"stop": ["x", "\udfff"]}, "stop", "stop[1]: a lone UTF-16 surrogate"),
        ({"messages": [{"content": [{"text": "\ud83d"}]}]}, "messages", "messages[0].content[0].text: a lone"),
        ({"user": {"a\ud800": 1}}, "user", "user.a\\ud800: a key with a lone UTF-16 surrogate"),
        ({"x": nested(MAX_JSON_DEPTH)}, "x", f"x[0][0][0][0][0]...: nested deeper than {MAX_JSON_DEPTH} levels"),
    ],
)
def test_check_json_refuses(body, param, message):
    with pytest.raises(APIError) as e:
        check_json(body)
    assert (e.value.status, e.value.param) == (400, param) and str(e.value).startswith(message)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "\U0001f600 \u00e9 \u4e2d", "stop": ["\n"]},  # a surrogate pair in JSON is one character
        {"x": nested(MAX_JSON_DEPTH - 1), "n": 1, "t": 0.5, "b": None},
    ],
)
def test_check_json_takes_text_and_shallow_bodies(body):
    check_json(body)


def test_parse_request_checks_the_whole_body_first():
    with pytest.raises(APIError, match="^model: a lone UTF-16 surrogate"):
        parse({"model": "nld_ar\ud800", "prompt": "p"})


def test_not_a_json_object():
    with pytest.raises(APIError, match="must be a JSON object"):
        parse_request(["nld_ar"], False, MODELS, render, len)


RESULT = {"num_input_tokens": 5, "num_output_tokens": 3, "finish_reason": "eos"}


@pytest.mark.parametrize("ours, theirs", [("eos", "stop"), ("length", "length"), ("abort", "abort")])
def test_whole_responses(ours, theirs):
    completion = response(Call("nld_ar", {}, is_chat=False, id="x"), "abc", {**RESULT, "finish_reason": ours})
    assert completion["id"] == "cmpl-x" and completion["object"] == "text_completion"
    assert completion["choices"] == [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": theirs}]
    assert completion["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    chat = response(Call("nld_ar", {}, is_chat=True, id="x"), "abc", {**RESULT, "finish_reason": ours})
    assert chat["id"] == "chatcmpl-x" and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert chat["choices"][0]["finish_reason"] == theirs


def test_stream_chunks():
    chat = Call("nld_ar", {}, is_chat=True, is_stream=True, include_usage=True, id="x")
    assert chunk(chat, None)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    piece = chunk(chat, "ab")
    assert piece["object"] == "chat.completion.chunk" and piece["usage"] is None
    assert piece["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": None, "delta": {"content": "ab"}}
    assert chunk(chat, "", "length")["choices"][0]["delta"] == {}
    assert chunk(chat, "", "eos")["choices"][0]["finish_reason"] == "stop"
    last = chunk(chat, None, result=RESULT)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 8
    completion = Call("nld_ar", {}, is_chat=False, is_stream=True, id="x")
    assert chunk(completion, "ab")["choices"][0]["text"] == "ab" and "usage" not in chunk(completion, "ab")


def test_models_list():
    listed = models_list(MODELS, 123)
    assert listed["object"] == "list"
    assert listed["data"][2] == {"id": "nld_self_spec", "object": "model", "created": 123, "owned_by": "trimode"}


A, B, C = Scored("a", [97], -0.5), Scored("b", [98], -1.5), Scored("\u00e9", [195, 169], -2.0)
TOKENS = [TokenLogProb(A, 0, [A, B]), TokenLogProb(C, 1, [C, Scored("c", [99], -2.0)])]


def test_completion_logprobs_json():
    call = Call("nld_ar", {}, is_chat=False, logprobs=2)
    assert logprobs_json(call, TOKENS) == {
        "tokens": ["a", "\u00e9"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"a": -0.5, "b": -1.5}, {"\u00e9": -2.0, "c": -2.0}],
        "text_offset": [0, 1],
    }
    assert logprobs_json(Call("nld_ar", {}, is_chat=False, logprobs=0), TOKENS)["top_logprobs"] is None
    assert logprobs_json(Call("nld_ar", {}, is_chat=False), TOKENS) is None  # not asked
    same_text = [TokenLogProb(A, 0, [A, Scored("a", [97], -3.0), B])]  # two ids, one text: the likelier
    assert logprobs_json(call, same_text)["top_logprobs"] == [{"a": -0.5, "b": -1.5}]


def test_chat_logprobs_json_and_choices():
    call = Call("nld_ar", {}, is_chat=True, is_stream=True, logprobs=1)
    content = logprobs_json(call, TOKENS)["content"]
    assert content[1] == {
        "token": "\u00e9",
        "logprob": -2.0,
        "bytes": [195, 169],
        "top_logprobs": [
            {"token": "\u00e9", "logprob": -2.0, "bytes": [195, 169]},
            {"token": "c", "logprob": -2.0, "bytes": [99]},
        ],
    }
    assert chunk(call, "a\u00e9", tokens=TOKENS)["choices"][0]["logprobs"]["content"] == content
    assert chunk(call, None)["choices"][0]["logprobs"] is None  # the role-only opening
    whole = response(Call("nld_ar", {}, is_chat=False, logprobs=0), "a\u00e9", RESULT, TOKENS)
    assert whole["choices"][0]["logprobs"]["tokens"] == ["a", "\u00e9"]


@pytest.fixture(scope="module")
def token_texts(tiny_dir):
    from trimode.config import ModelSpec
    from trimode.tokenizer import Tokenizer
    from trimode.triton_repo.openai_api import TokenTexts

    tokenizer = Tokenizer(tiny_dir, ModelSpec.from_file(tiny_dir / "config.json"))
    return TokenTexts(tokenizer.decode, tokenizer.vocab), tokenizer.vocab()


def test_token_texts(token_texts):
    """Text as it is; a byte of a character as its byte (ByteLevel writes 0xC3 as "Ã"); a special token by name."""
    texts, vocab = token_texts
    assert texts.piece(vocab["a"]) == ("a", [97], True)
    assert texts.piece(vocab["\u00c3"]) == ("bytes:\\xc3", [0xC3], True)
    assert texts.piece(vocab["</s>"]) == ("</s>", list(b"</s>"), False)


def test_request_logprobs_offsets_run_on_across_responses(token_texts):
    from trimode.triton_repo.openai_api import IMPOSSIBLE_LOGPROB, RequestLogProbs

    texts, vocab = token_texts
    ids = [vocab["a"], vocab["\u00c3"], vocab["\u00a9"], vocab["</s>"], vocab["b"]]  # "a", "é" in two bytes, eos, "b"
    result = {"token_ids": ids, "log_probs": [-1.0] * 5, "top_log_probs": [[(vocab["b"], float("-inf"))]] * 5}
    whole = RequestLogProbs(texts).of(result)
    assert [t.text_offset for t in whole] == [0, 1, 1, 2, 2]
    assert bytes(b for t in whole[:3] for b in t.emitted.utf8).decode() == "a\u00e9"
    assert whole[0].top == [Scored("b", [98], IMPOSSIBLE_LOGPROB)]
    streamed = RequestLogProbs(texts)
    pieces = [streamed.of({k: v[i : i + 2] for k, v in result.items()}) for i in (0, 2, 4)]
    assert [t for piece in pieces for t in piece] == whole
    cut = {**result, "token_ids": [vocab["\u00c3"], vocab["b"], vocab["\u00a9"], vocab["a"]]}  # "\ufffdb\ufffda"
    assert [t.text_offset for t in RequestLogProbs(texts).of({k: v[:4] for k, v in cut.items()})] == [0, 1, 2, 3]
    with pytest.raises(APIError, match="no output_token_ids") as e:
        RequestLogProbs(texts).of({**result, "token_ids": None})
    assert e.value.status == 500
