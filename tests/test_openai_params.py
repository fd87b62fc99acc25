"""OpenAI request bodies -> ensemble tensors, and results -> OpenAI's JSON, without a server."""

from __future__ import annotations

import pytest

from trimode.errors import InputError
from trimode.triton_repo.openai_params import APIError, Call, chunk, models_list, parse_request, response

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
        ({"model": "nld_ar", "prompt": "p", "logprobs": 1}, 400, "logprobs", "logprobs=1"),
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
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", "logprobs=True"),
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
