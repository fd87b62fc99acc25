"""The OpenAI front end over the real tritonserver (tiny engine, one server per module), driven by
the real `openai` client: completions and chat, whole and streamed, equal `trimode generate` on
the same engine at T = 0 (self_spec == ar); usage and finish reasons from the ensembles; OpenAI's
error shapes for what it cannot serve; and it keeps serving after every error.

Two front ends share the server: `plain` takes the tiny checkpoint's tokenizer_config.json, which
has no chat template, and `chat` is given the embedded checkpoint's template (--chat-template).
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from trimode.chat import DEFAULT_CHAT_TEMPLATE
from trimode.cli import main
from trimode.config import ModelSpec
from trimode.tokenizer import Tokenizer
from trimode.triton_repo.openai_api import OpenAIFrontend
from trimode.triton_repo.server import Ports, TritonServer
from trimode.triton_repo.writer import write_model_repo

from test_serve import abort_mid_stream, metrics

PROMPT = "def main():\n    "
MODELS = ["ar", "diffusion", "self_spec", "quadratic", "auto"]
MAX_SEQ_LEN, BLOCK = 96, 4  # the tiny engine's (conftest.tiny_engine_dir)


@pytest.fixture(scope="module")
def served(tiny_engine_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    repo = write_model_repo(tiny_engine_dir, root / "repo")
    template = root / "chat_template.jinja"
    template.write_text(DEFAULT_CHAT_TEMPLATE)
    with TritonServer(repo, ports=Ports.free(), log_path=root / "tritonserver.log") as triton:
        url = f"127.0.0.1:{triton.ports.grpc}"
        with (
            OpenAIFrontend(repo, url, port=Ports.free().http) as plain,
            OpenAIFrontend(repo, url, port=Ports.free().http, chat_template_path=template) as chat,
        ):
            yield {"triton": triton, "repo": repo, "template": template, "plain": plain, "chat": chat}


def api(frontend: OpenAIFrontend) -> openai.OpenAI:
    return openai.OpenAI(base_url=frontend.endpoint, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def plain(served):
    return api(served["plain"])


@pytest.fixture(scope="module")
def chat(served):
    return api(served["chat"])


@pytest.fixture(scope="module")
def tokenizer(tiny_engine_dir):
    checkpoint_dir = tiny_engine_dir / "checkpoint"
    return Tokenizer(checkpoint_dir, ModelSpec.from_file(checkpoint_dir / "config.json"))


def local(engine_dir, prompt: str, mode: str, max_tokens: int, *options) -> dict:
    """`trimode generate --engine` on the same engine dir: the one result of its --json."""
    from click.testing import CliRunner

    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--engine",
            str(engine_dir),
            "--mode",
            mode.replace("_", "-"),
            "--block-length",
            str(BLOCK),
            "--max-new-tokens",
            str(max_tokens),
            "--json",
            *map(str, options),
            prompt,
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"][0]


def assert_keeps_serving(client: openai.OpenAI) -> None:
    assert client.completions.create(model="ar", prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_models_one_per_mode(plain):
    assert [m.id for m in plain.models.list().data] == MODELS
    assert plain.models.retrieve("self_spec").owned_by == "trimode"
    with pytest.raises(openai.NotFoundError) as e:
        plain.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("mode", MODELS)
def test_completion_equals_local_generation(plain, tiny_engine_dir, tokenizer, mode):
    got = plain.completions.create(model=mode, prompt=PROMPT, max_tokens=12, temperature=0)
    want = local(tiny_engine_dir, PROMPT, mode, 12)
    assert got.object == "text_completion" and got.model == mode and len(got.choices) == 1
    assert got.choices[0].text == want["text"]
    assert got.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want["finish_reason"]]
    assert got.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert got.usage.completion_tokens == len(want["tokens"])
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_self_spec_equals_ar(plain):
    texts = [
        plain.completions.create(model=m, prompt="class A:", max_tokens=20, extra_body={"ignore_eos": True})
        for m in ("ar", "self_spec")
    ]
    assert texts[0].choices[0].text == texts[1].choices[0].text
    assert texts[0].usage.completion_tokens == texts[1].usage.completion_tokens == 20
    assert texts[0].choices[0].finish_reason == "length"


def test_streamed_completion_arrives_in_pieces(plain):
    request = dict(model="ar", prompt="import os\n", max_tokens=24, extra_body={"ignore_eos": True})
    chunks = list(plain.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    whole = plain.completions.create(**request)
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert len(pieces) >= 2  # an event per step, or several steps' tokens in one when the client lags (loop.py)
    assert "".join(p.text for p in pieces) == whole.choices[0].text
    assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_equals_local_generate_chat(served, chat, tiny_engine_dir, tokenizer):
    messages = [{"role": "user", "content": "add two numbers"}]
    got = chat.chat.completions.create(model="ar", messages=messages, max_completion_tokens=12, temperature=0)
    want = local(tiny_engine_dir, "add two numbers", "ar", 12, "--chat", "--chat-template", served["template"])
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["text"]
    assert got.usage.prompt_tokens == len(tokenizer.encode('"""add two numbers"""\n\n'))
    assert got.usage.completion_tokens == len(want["tokens"])
    streamed = list(chat.chat.completions.create(model="ar", messages=messages, max_tokens=12, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want["text"]
    assert streamed[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_chat_without_max_tokens_fills_the_engine(chat, tokenizer):
    """OpenAI's chat default is unbounded: here, the room the engine has after the prompt."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    got = chat.chat.completions.create(model="ar", messages=messages, extra_body={"ignore_eos": True})
    prompt_tokens = len(tokenizer.encode('"""be brief"""\n"""hi"""\n\n'))
    assert got.usage.prompt_tokens == prompt_tokens
    assert got.usage.completion_tokens == MAX_SEQ_LEN - BLOCK - prompt_tokens
    assert got.choices[0].finish_reason == "length"


def test_chat_without_a_template_is_a_400(plain):
    with pytest.raises(openai.BadRequestError) as e:
        plain.chat.completions.create(model="ar", messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in e.value.message and "--chat-template" in e.value.message
    assert e.value.body["param"] == "messages"
    assert_keeps_serving(plain)


@pytest.mark.parametrize(
    "request_, error, param, message",
    [
        ({"model": "gpt-4"}, openai.NotFoundError, "model", "The model 'gpt-4' does not exist"),
        ({"n": 2}, openai.BadRequestError, "n", "n=2 is not supported: one choice per request"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens", "max_tokens: expected an integer in [1,"),
        ({"max_tokens": "4"}, openai.BadRequestError, "max_tokens", "got '4'"),
        ({"temperature": 3.0}, openai.BadRequestError, "temperature", "temperature: expected a number in [0.0, 2.0]"),
        ({"logprobs": -1}, openai.BadRequestError, "logprobs", "logprobs: expected an integer in [0, 20], got -1"),
        ({"logprobs": 21}, openai.BadRequestError, "logprobs", "got 21"),
        ({"echo": True}, openai.BadRequestError, "echo", "echo=True is not supported"),
        ({"prompt": [1, 2, 3]}, openai.BadRequestError, "prompt", "a list of prompts or token ids is not supported"),
        ({"prompt": ""}, openai.BadRequestError, "prompt", "the prompt is empty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop", "up to 4"),
        # refused by the engine (tritonserver's error, passed on)
        ({"max_tokens": 500}, openai.BadRequestError, None, "max_tokens (500)"),
        ({"top_p": 0.5}, openai.BadRequestError, None, "nucleus sampling is not supported"),
        ({"stop": ["def main"]}, openai.BadRequestError, None, "single-token stop words"),
        ({"max_tokens": 500, "stream": True}, openai.BadRequestError, None, "max_tokens (500)"),
    ],
)
def test_bad_requests_then_good(plain, request_, error, param, message):
    with pytest.raises(error) as e:
        result = plain.completions.create(**{"model": "ar", "prompt": "x", "max_tokens": 4, **request_})
        list(result) if request_.get("stream") else None
    assert message in e.value.message
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert_keeps_serving(plain)


def special_tokens(tokenizer) -> set[str]:
    """The names of the tokens that are no text (decoded alone: nothing)."""
    return {name for name, i in tokenizer.vocab().items() if not tokenizer.decode([i])}


def assert_tops(value: float, token: str, top: list[tuple[str, float]], k: int) -> None:
    """k alternatives, most likely first; at T = 0 the emitted token is the most likely (mask excluded)."""
    values = [v for _, v in top]
    assert len(top) == k and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert top[0][0] == token and top[0][1] == pytest.approx(value, abs=1e-5)


@pytest.mark.parametrize("mode", MODELS)
def test_completion_logprobs(plain, tokenizer, mode):
    got = plain.completions.create(model=mode, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    choice, special = got.choices[0], special_tokens(tokenizer)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == got.usage.completion_tokens >= 1
    assert (
        len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == len(logprobs.tokens)
    )
    assert all(v <= 0 for v in logprobs.token_logprobs)
    for token, value, top, offset in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset
    ):
        assert_tops(value, token, list(top.items()), 3)
        if not token.startswith("bytes:") and token not in special:  # a whole text: where the offset says
            assert choice.text[offset : offset + len(token)] == token
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    streamed = list(
        plain.completions.create(model=mode, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3, stream=True)
    )
    pieces = [c.choices[0].logprobs for c in streamed]
    for name in ("tokens", "text_offset"):
        assert [x for piece in pieces for x in getattr(piece, name)] == getattr(logprobs, name)
    values = [v for piece in pieces for v in piece.token_logprobs]
    assert values == pytest.approx(logprobs.token_logprobs, abs=1e-5)
    without = plain.completions.create(model=mode, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    assert without.choices[0].logprobs.top_logprobs is None and without.choices[0].logprobs.tokens == logprobs.tokens


def test_chat_logprobs_whole_and_streamed(chat, tokenizer):
    request = dict(
        model="self_spec", messages=[{"role": "user", "content": "add two numbers"}], max_tokens=12, temperature=0
    )
    got = chat.chat.completions.create(**request, logprobs=True, top_logprobs=2)
    content, special = got.choices[0].logprobs.content, special_tokens(tokenizer)
    assert len(content) == got.usage.completion_tokens >= 1
    for c in content:
        assert c.logprob <= 0 and (c.bytes == list(c.token.encode()) or c.token.startswith("bytes:"))
        assert_tops(c.logprob, c.token, [(t.token, t.logprob) for t in c.top_logprobs], 2)
    text = bytes(b for c in content if c.token not in special for b in c.bytes).decode(errors="replace")
    assert text == got.choices[0].message.content
    streamed = list(chat.chat.completions.create(**request, logprobs=True, top_logprobs=2, stream=True))
    assert streamed[0].choices[0].logprobs is None  # the role-only opening
    pieces = [c for chunk in streamed[1:] for c in chunk.choices[0].logprobs.content]
    assert [(c.token, [t.token for t in c.top_logprobs]) for c in pieces] == [
        (c.token, [t.token for t in c.top_logprobs]) for c in content
    ]
    assert [c.logprob for c in pieces] == pytest.approx([c.logprob for c in content], abs=1e-5)
    plain_chat = chat.chat.completions.create(**request, logprobs=True)
    assert [c.top_logprobs for c in plain_chat.choices[0].logprobs.content] == [[]] * len(content)
    assert chat.chat.completions.create(**request).choices[0].logprobs is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_logprobs": 2}, "top_logprobs=2: only with logprobs=true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs: expected an integer in [0, 20], got 21"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs: expected an integer in [0, 20], got -1"),
    ],
)
def test_bad_chat_logprobs(chat, options, message):
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(model="ar", messages=[{"role": "user", "content": "x"}], max_tokens=2, **options)
    assert message in e.value.message and e.value.body["param"] == "top_logprobs"
    assert_keeps_serving(chat)


def test_client_log_probs_over_grpc_and_http(served):
    """client.py's results carry the ids, log probs and top-k of their tokens over both protocols."""
    from trimode.triton_repo import client

    ports, inputs = served["triton"].ports, {"text_input": PROMPT, "max_tokens": 6, "num_top_log_probs": 2}
    over_grpc = client.infer(f"127.0.0.1:{ports.grpc}", "ar", inputs)
    over_http = client.infer(f"127.0.0.1:{ports.http}", "ar", inputs, protocol="http")
    assert len(over_grpc["token_ids"]) == len(over_grpc["log_probs"]) == over_grpc["num_output_tokens"]
    assert over_http["token_ids"] == over_grpc["token_ids"]
    assert [[i for i, _ in top] for top in over_http["top_log_probs"]] == [
        [i for i, _ in top] for top in over_grpc["top_log_probs"]
    ]
    assert [top[0][0] for top in over_grpc["top_log_probs"]] == over_grpc["token_ids"]
    assert "log_probs" not in client.infer(f"127.0.0.1:{ports.grpc}", "ar", {"text_input": PROMPT, "max_tokens": 2})


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/completions", b"[]", 400, "must be a JSON object"),
        ("POST", "/v1/embeddings", b"{}", 404, "no such endpoint"),
        ("GET", "/v2/health/ready", None, 404, "no such endpoint"),
    ],
)
def test_raw_http_errors_have_openai_shape(served, method, path, body, status, message):
    frontend = served["plain"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{frontend.port}{path}",
        data=body,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == status
    assert message in json.loads(e.value.read())["error"]["message"]


def test_unreachable_triton_is_a_503(served):
    """A front end whose tritonserver is gone answers 503 (retry later), then keeps serving models."""
    with OpenAIFrontend(served["repo"], f"127.0.0.1:{Ports.free().grpc}", port=Ports.free().http) as lonely:
        client = api(lonely)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="ar", prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["type"] == "server_error"
        assert len(client.models.list().data) == len(MODELS)


def test_trimode_bench_points_at_it(served, runner, tmp_path):
    """trimode bench's OpenAI target (streamed completions, usage, ignore_eos) measures through it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main():\nimport os\nclass A:\n")
    result = runner.invoke(
        main,
        [
            "bench",
            "--openai",
            f"http://127.0.0.1:{served['plain'].port}",
            "--modes",
            "ar,self-spec",
            "--concurrency",
            "1,2",
            "--requests",
            "2",
            "--max-tokens",
            "6",
            "--warmup",
            "0",
            "--prompts",
            str(prompts),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    cells = sorted((r["mode"], r["concurrency"]) for r in rows)
    assert cells == [("ar", 1), ("ar", 2), ("self-spec", 1), ("self-spec", 2)]
    assert all(r["num_requests"] == 2 and r["num_output_tokens"] == 12 and r["tokens_per_s"] > 0 for r in rows)


def test_stop_ends_open_connections(served):
    """A keep-alive connection idle in its handler is closed by stop(), not left to a daemon thread."""
    frontend = OpenAIFrontend(served["repo"], "127.0.0.1:1", port=Ports.free().http).start()
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=10) as connection:
        connection.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = connection.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        headers = dict(line.decode().split(": ", 1) for line in iter(reader.readline, b"\r\n"))
        assert json.loads(reader.read(int(headers["Content-Length"])))["object"] == "list"
        frontend.stop()  # the connection is still open, idle
        assert reader.read() == b""  # end of file, at once


def test_concurrent_requests_get_their_solo_text(plain):
    prompts = ["def main():\n    ", "import os\n", "class A:", "x = [1, 2"]
    solo = [plain.completions.create(model="diffusion", prompt=p, max_tokens=16).choices[0].text for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(
                lambda p: plain.completions.create(model="diffusion", prompt=p, max_tokens=16).choices[0].text, prompts
            )
        )
    assert together == solo


def test_client_gone_mid_stream_frees_its_slot(served, plain):
    def cancel_one():
        stream = plain.completions.create(
            model="ar", prompt="for i in range(", max_tokens=70, stream=True, extra_body={"ignore_eos": True}
        )
        assert next(iter(stream)).choices[0].finish_reason is None
        stream.close()

    abort_mid_stream(served["triton"], cancel_one)
    assert metrics(served["triton"])['trimode_batch_occupancy{mode="all",model="engine"}'] == 0
    assert_keeps_serving(plain)


def test_serve_refuses_a_taken_openai_port(refused, served, monkeypatch):
    """The port is checked before tritonserver starts (which would take seconds): one error line."""
    taken, ports = served["plain"].port, Ports.free()
    starts = []
    monkeypatch.setattr(TritonServer, "start", lambda self: starts.append(self) or self)
    refused(
        [
            "serve",
            served["repo"],
            "--http-port",
            ports.http,
            "--grpc-port",
            ports.grpc,
            "--metrics-port",
            ports.metrics,
            "--openai-port",
            taken,
        ],
        served["repo"],
        f"--openai-port {taken}: cannot listen",
    )
    assert starts == []  # refused before, not after a server start (no timing: CI boxes are loaded)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--grpc-port", "9301", "--openai-port", "9301"], "the HTTP, gRPC, metrics and OpenAI ports must differ"),
        (["--openai-port", "8000"], "the HTTP, gRPC, metrics and OpenAI ports must differ"),
        (["--chat-template", "t.jinja"], "--openai-port (Triton's own endpoints take prompts)"),
    ],
)
def test_serve_refuses_bad_openai_options(refused, served, options, message):
    refused(["serve", served["repo"], *options], served["repo"], message, exit_code=2)


def test_serve_refuses_an_unreadable_chat_template(refused, served, tmp_path):
    ports = Ports.free()
    refused(
        [
            "serve",
            served["repo"],
            "--http-port",
            ports.http,
            "--grpc-port",
            ports.grpc,
            "--metrics-port",
            ports.metrics,
            "--openai-port",
            Ports.free().http,
            "--chat-template",
            tmp_path / "missing.jinja",
        ],
        tmp_path,
        "missing.jinja: cannot read the chat template",
    )
