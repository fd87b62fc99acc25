"""The real tritonserver on 127.0.0.1 over a repository of the tiny engine (one server per module).

Every ensemble answers over gRPC and HTTP (Triton's generate and generate_stream endpoints) with
the text local generation gives on the same engine dir (T = 0), self_spec == ar; streams arrive
in pieces; staggered and mixed-mode requests batch in flight and keep their solo tokens; bad
requests get clear errors and the server keeps serving.
"""

from __future__ import annotations

import queue
import threading
import time
import urllib.request

import pytest

from trimode.builder.engine_dir import load_engine
from trimode.cli import main
from trimode.decoding import DecodeConfig, SamplingParams
from trimode.triton_repo import client
from trimode.triton_repo.client import RemoteError
from trimode.triton_repo.server import Ports, TritonServer
from trimode.triton_repo.writer import write_model_repo

PROMPTS = ["def main():\n    ", "import os\n", "class A:", "x = [1, 2", "for i in range(", "print(", "# a", "if x:"]
MODES = {"ar": "ar", "diffusion": "diffusion", "self_spec": "self-spec", "quadratic": "quadratic", "auto": "auto"}
BLOCK = 4  # the engine's block length (the tiny checkpoint's block_size, 8, is not built)


@pytest.fixture(scope="module")
def server(tiny_engine_dir, tmp_path_factory):
    repo = write_model_repo(tiny_engine_dir, tmp_path_factory.mktemp("serve") / "repo")
    log = repo.parent / "tritonserver.log"
    with TritonServer(repo, ports=Ports.free(), log_path=log) as s:
        yield s


@pytest.fixture(scope="module")
def local(tiny_engine_dir):
    built = load_engine(tiny_engine_dir)

    def generate(prompt: str, mode: str, max_tokens: int, ignore_eos: bool = False) -> str:
        engine = built.new_engine()
        seq = engine.add(
            built.checkpoint.tokenizer.encode(prompt),
            SamplingParams(max_tokens, ignore_eos=ignore_eos),
            DecodeConfig(MODES[mode], BLOCK),
        )
        while engine.has_work:
            engine.step()
        return built.checkpoint.tokenizer.decode(seq.tokens)

    return generate


def url(server, protocol: str) -> str:
    return f"127.0.0.1:{server.ports.grpc if protocol == 'grpc' else server.ports.http}"


def metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.endpoints["metrics"]).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("trimode_")
    }


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_ensemble_equals_local_generation(server, local, mode, protocol):
    got = client.infer(url(server, protocol), mode, {"text_input": PROMPTS[0], "max_tokens": 16}, protocol)
    assert got["text"] == local(PROMPTS[0], mode, 16)
    assert got["num_output_tokens"] >= 1 and got["finish_reason"] in ("eos", "length")
    assert got["num_forward_passes"] >= 1


@pytest.mark.parametrize("mode", ["self_spec", "quadratic", "auto"])
def test_the_lossless_modes_equal_ar(server, mode):
    for prompt in PROMPTS[:3]:
        inputs = {"text_input": prompt, "max_tokens": 20, "end_id": -1}
        ar, spec = (client.infer(url(server, "grpc"), m, inputs) for m in ("ar", mode))
        assert spec["text"] == ar["text"] and spec["num_output_tokens"] == ar["num_output_tokens"] == 20
        assert ar["mean_accepted_length"] == 0.0
        if mode != "auto":  # auto may have run AR only
            assert spec["mean_accepted_length"] >= 1.0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stream_arrives_in_pieces(server, protocol):
    inputs = {"text_input": PROMPTS[1], "max_tokens": 24, "end_id": -1}
    stream = client.stream_grpc if protocol == "grpc" else client.stream_http
    pieces = list(stream(url(server, protocol), "ar", inputs))
    whole = client.infer(url(server, protocol), "ar", inputs, protocol)
    counts = [p["num_output_tokens"] for p in pieces]  # a response per step, or several steps' tokens in
    assert len(pieces) >= 2 and counts == sorted(set(counts)) and counts[-1] == 24  # one when the client lags
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert [p["finish_reason"] for p in pieces] == [""] * (len(pieces) - 1) + ["length"]


def test_staggered_requests_batch_in_flight(server, local):
    """8 requests, each sent while others run: all get their solo text, and the pool held several at once.

    A 40-token request takes ~50 ms here, but on a fast quiet box each may end before the next
    arrives; only then (the pool never held two) is the round sent again, with longer requests."""
    key = 'trimode_batch_occupancy_max{mode="ar",model="engine"}'
    for max_tokens in (40, 60, 80):  # the tiny engine's max_seq_len (96) holds prompt + 80
        results: dict[int, str] = {}

        def send(i: int) -> None:
            results[i] = client.infer(
                url(server, "grpc"), "ar", {"text_input": PROMPTS[i], "max_tokens": max_tokens, "end_id": -1}
            )["text"]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join(120)
        assert results == {i: local(PROMPTS[i], "ar", max_tokens, ignore_eos=True) for i in range(8)}
        after = metrics(server)
        assert after['trimode_batch_occupancy{mode="all",model="engine"}'] == 0  # idle again: every slot freed
        if after[key] > 1:
            break
    assert after[key] > 1


def test_all_modes_at_once(server, local):
    results: dict[tuple, str] = {}

    def send(mode: str, i: int) -> None:
        protocol = "http" if i % 2 else "grpc"
        results[mode, i] = client.infer(
            url(server, protocol), mode, {"text_input": PROMPTS[i], "max_tokens": 12}, protocol
        )["text"]

    threads = [threading.Thread(target=send, args=(m, i)) for m in MODES for i in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {(m, i): local(PROMPTS[i], m, 12) for m in MODES for i in (2, 3)}
    assert metrics(server)['trimode_batch_occupancy_max{mode="all",model="engine"}'] > 1


@pytest.mark.parametrize(
    "model, inputs, message",
    [
        ("ar", {"max_tokens": 4}, "missing required input(s) ['text_input']"),
        ("ar", {"text_input": "x", "max_tokens": 0}, "max_tokens: expected an integer >= 1, got 0"),
        ("ar", {"text_input": "x", "max_tokens": -3}, "max_tokens: expected an integer >= 1, got -3"),
        ("ar", {"text_input": "x", "max_tokens": 500}, "max_tokens (500)"),
        ("ar", {"text_input": "x", "max_tokens": "four"}, "non-signed-integer"),
        ("ar", {"text_input": "", "max_tokens": 4}, "text_input: the prompt is empty"),
        ("nope", {"text_input": "x", "max_tokens": 4}, "unknown model: 'nope'"),
        ("ar", {"text_input": "x", "max_tokens": 4, "temperature": float("nan")}, "temperature: expected a finite"),
        ("ar", {"text_input": "x", "max_tokens": 4, "beam_width": 2}, "beam search is not supported"),
        ("ar", {"text_input": "x", "max_tokens": 4, "top_p": 0.5}, "top_p=0.5"),
        ("diffusion", {"text_input": "x", "max_tokens": 4, "block_length": 8}, "built for block lengths 4"),
        ("ar", {"text_input": "x", "max_tokens": 4, "stop_words": ["def main"]}, "single-token stop words"),
    ],
)
def test_bad_requests_then_good(server, model, inputs, message):
    with pytest.raises(RemoteError) as e:
        client.infer(url(server, "http"), model, inputs, "http")
    assert message in str(e.value)
    if "text_input" in inputs and isinstance(inputs["max_tokens"], int):  # the same over gRPC
        with pytest.raises(RemoteError) as e:
            client.infer(url(server, "grpc"), model, inputs)
        assert message in str(e.value)
    assert client.infer(url(server, "grpc"), "ar", {"text_input": "ok", "max_tokens": 2})["num_output_tokens"] >= 1


def test_cli_generate_url(server, runner, local):
    result = runner.invoke(
        main,
        [
            "generate",
            "--url",
            url(server, "grpc"),
            "--mode",
            "self-spec",
            "--block-length",
            "4",
            "--max-new-tokens",
            "8",
            "--json",
            PROMPTS[0],
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    assert json.loads(result.output)["results"][0]["text"] == local(PROMPTS[0], "self_spec", 8)
    result = runner.invoke(
        main,
        [
            "generate",
            "--url",
            url(server, "http"),
            "--protocol",
            "http",
            "--stream",
            "--max-new-tokens",
            "8",
            PROMPTS[0],
        ],
    )
    assert result.exit_code == 0 and result.stdout.startswith(PROMPTS[0] + local(PROMPTS[0], "ar", 8))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "protocol, hint",
    [("http", "is that the gRPC port? pass --protocol grpc"), ("grpc", "is that the HTTP port? pass --protocol http")],
)
def test_cli_generate_url_of_the_other_protocol(server, refused, tmp_path, protocol, hint, stream):
    """HTTP to the gRPC port, or gRPC to the HTTP port: one error line that says so (nothing on stdout)."""
    other = url(server, "grpc" if protocol == "http" else "http")
    result = refused(
        ["generate", "--url", other, "--protocol", protocol, *(["--stream"] * stream), PROMPTS[0]], tmp_path, hint
    )
    assert result.error.startswith(f"Error: --url {other}: no Triton server answers there over {protocol} (")


def test_metrics_match_the_responses_statistics(server):
    """Per mode: requests, tokens, forward passes and (self-spec) accepted tokens per cycle, as scraped."""
    key = lambda family, mode: f'{family}{{mode="{mode}",model="engine"}}'  # noqa: E731
    for name, mode in MODES.items():
        if name == "auto":
            continue  # its cycles: test_auto_counts_the_cycles_of_each_mode
        before = metrics(server)
        got = [client.infer(url(server, "grpc"), name, {"text_input": p, "max_tokens": 10}) for p in PROMPTS[5:7]]
        after = metrics(server)
        delta = lambda family: after.get(key(family, mode), 0) - before.get(key(family, mode), 0)  # noqa: E731
        assert delta("trimode_requests_total") == 2
        assert delta("trimode_generated_tokens_total") == sum(g["num_output_tokens"] for g in got)
        assert delta("trimode_forward_passes_total") == sum(g["num_forward_passes"] for g in got)
        cycles = delta("trimode_speculation_cycles_total")
        if name in ("self_spec", "quadratic"):  # the responses' mean over both requests' cycles, weighted by cycles
            assert cycles >= 2
            assert delta("trimode_accepted_tokens_total") / cycles == pytest.approx(
                sum(g["mean_accepted_length"] for g in got) / 2, rel=0.5
            )
            one = client.infer(url(server, "grpc"), name, {"text_input": PROMPTS[7], "max_tokens": 10})
            last = metrics(server)
            accepted = (
                last[key("trimode_accepted_tokens_total", mode)] - after[key("trimode_accepted_tokens_total", mode)]
            )
            cycles = (
                last[key("trimode_speculation_cycles_total", mode)]
                - after[key("trimode_speculation_cycles_total", mode)]
            )
            assert accepted / cycles == pytest.approx(one["mean_accepted_length"], rel=1e-5)
        else:
            assert cycles == 0 and delta("trimode_accepted_tokens_total") == 0


def test_auto_counts_the_cycles_of_each_mode(server):
    """auto's requests are counted as auto; trimode_auto_cycles_total says which mode ran its cycles."""
    ran = lambda m: sum(v for k, v in m.items() if k.startswith("trimode_auto_cycles_total"))  # noqa: E731
    before = metrics(server)
    got = [
        client.infer(url(server, "grpc"), "auto", {"text_input": p, "max_tokens": 12, "end_id": -1})
        for p in PROMPTS[:2]
    ]
    after = metrics(server)
    requests = 'trimode_requests_total{mode="auto",model="engine"}'
    assert after[requests] - before.get(requests, 0) == 2
    cycles = ran(after) - ran(before)
    assert (
        2 <= cycles <= sum(g["num_output_tokens"] for g in got)
    )  # each cycle emits >= 1 token, the first is the prefill's
    assert all(
        k.split('ran="')[1].split('"')[0] in ("ar", f"self-spec/{BLOCK}", f"quadratic/{BLOCK}")
        for k in after
        if k.startswith("trimode_auto_cycles_total")
    )


def abort_mid_stream(server, cancel_one) -> tuple[dict, dict]:
    """cancel_one(): start a 70-token AR stream, read its first response, close it. The cancel races the
    tiny model (70 tokens in ~0.1 s): a try whose tokens all came first ends as "length" (1 try in ~20
    on a quiet box; 3 in a row once in CI). Tries again, apart, until one ends as "abort"; the metrics
    before and after that one."""
    aborted = 'trimode_requests_finished_total{mode="ar",model="engine",reason="abort"}'
    ran_out = 'trimode_requests_finished_total{mode="ar",model="engine",reason="length"}'
    for _ in range(10):
        before = metrics(server)
        cancel_one()
        deadline = time.monotonic() + 30
        while (
            all(metrics(server).get(k, 0) == before.get(k, 0) for k in (aborted, ran_out))
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        after = metrics(server)
        if after.get(ran_out, 0) == before.get(ran_out, 0):
            assert after.get(aborted, 0) == before.get(aborted, 0) + 1
            return before, after
        time.sleep(0.5)  # a busy moment passes
    raise AssertionError("10 cancelled streams all ran to max_tokens")


def test_client_that_disconnects_mid_stream_frees_its_slot(server):
    """The stream is cancelled after its first token: the engine aborts the request (Triton 2.51 does
    not pass an ensemble's cancel to the running step: postprocessing relays it) and the slot is free."""
    tokens = 'trimode_generated_tokens_total{mode="ar",model="engine"}'

    def cancel_one():
        stream = client.stream_grpc(
            url(server, "grpc"), "ar", {"text_input": PROMPTS[4], "max_tokens": 70, "end_id": -1}
        )
        assert next(stream)["num_output_tokens"] == 1
        stream.close()  # stop_stream(cancel_requests=True), as a client that goes away

    before, after = abort_mid_stream(server, cancel_one)
    assert after[tokens] - before.get(tokens, 0) < 70  # stopped early, not run to max_tokens
    assert after['trimode_batch_occupancy{mode="all",model="engine"}'] == 0
    assert (
        client.infer(url(server, "grpc"), "ar", {"text_input": "ok", "max_tokens": 3, "end_id": -1})[
            "num_output_tokens"
        ]
        == 3
    )


def test_a_client_of_the_engine_model_itself_that_disconnects_frees_its_slot(server):
    """Without an ensemble the cancel reaches the engine through the request's response sender, which
    the loop asks every 50 ms (loop.py SENDER_POLL_S)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name, array):
        t = grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else name_type[name])
        t.set_data_from_numpy(array)
        return t

    name_type = {"input_ids": "INT32", "input_lengths": "INT32", "max_tokens": "INT32", "end_id": "INT32"}
    name_type["stream"] = "BOOL"
    values = {"input_ids": [3, 4, 5, 6], "input_lengths": [4], "max_tokens": [70], "end_id": [-1], "stream": [True]}

    def cancel_one():
        first: queue.Queue = queue.Queue()
        stream = grpcclient.InferenceServerClient(url(server, "grpc"))
        stream.start_stream(callback=lambda result, error: first.put(error or result))
        inputs = [tensor(k, np.array([v], dtype=bool if k == "stream" else np.int32)) for k, v in values.items()]
        stream.async_stream_infer("engine", [*inputs, tensor("mode", np.array([[b"ar"]], dtype=object))])
        got = first.get(timeout=60)
        assert not isinstance(got, Exception), got.message()
        stream.stop_stream(cancel_requests=True)
        stream.close()

    before, after = abort_mid_stream(server, cancel_one)
    assert after['trimode_batch_occupancy{mode="all",model="engine"}'] == 0
