"""TensorRT-LLM's ensemble interface, as their client scripts use it, on the real tritonserver.

Their scripts (tensorrtllm_backend: inflight_batcher_llm/client/end_to_end_grpc_client.py,
tools/inflight_batcher_llm/end_to_end_test.py) cannot be copied here; these tests pin what they
rely on: text_output [1] per response (`output[0].decode()`), cum_log_probs [1, 1] and
output_log_probs [1, 1, tokens] with return_log_probs, batch_index [1, 1] on each response of a
request holding several prompts, the current input names (seed, min_tokens, ...), the model name
`ensemble`, plain ModelInfer on a repository written with --no-decoupled, and an input that is
not in the schema refused over HTTP as gRPC refuses it. One streaming server and one plain server.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest

from trimode.builder.engine_dir import load_engine
from trimode.decoding import DecodeConfig, SamplingParams
from trimode.passes import Mode
from trimode.triton_repo.server import Ports, TritonServer
from trimode.triton_repo.settings import RepoSettings
from trimode.triton_repo.writer import write_model_repo

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")

PROMPTS = ["def main():\n    ", "import os\n", "class A:"]
MODES = {"ar": "ar", "diffusion": "diffusion", "self_spec": "self-spec"}
BLOCK = 4


@pytest.fixture(scope="module")
def streaming(tiny_engine_dir, tmp_path_factory):
    """A decoupled repository that also serves self-spec as `ensemble`."""
    root = tmp_path_factory.mktemp("trtllm-decoupled")
    repo = write_model_repo(tiny_engine_dir, root / "repo", RepoSettings(ensemble_mode=Mode.SELF_SPEC))
    with TritonServer(repo, ports=Ports.free(), log_path=root / "tritonserver.log") as s:
        yield s


@pytest.fixture(scope="module")
def plain(tiny_engine_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm-plain")
    repo = write_model_repo(tiny_engine_dir, root / "repo", RepoSettings(decoupled=False, ensemble_mode=Mode.AR))
    with TritonServer(repo, ports=Ports.free(), log_path=root / "tritonserver.log") as s:
        yield s


@pytest.fixture(scope="module")
def local(tiny_engine_dir):
    """(tokens' text, log probs) of local generation on the same engine dir."""
    built = load_engine(tiny_engine_dir)

    def generate(prompt: str, mode: str, max_tokens: int) -> tuple[str, list[float]]:
        engine = built.new_engine()
        seq = engine.add(
            built.checkpoint.tokenizer.encode(prompt),
            SamplingParams(max_tokens, ignore_eos=True, logprobs=0),
            DecodeConfig(MODES[mode], BLOCK),
        )
        while engine.has_work:
            engine.step()
        return built.checkpoint.tokenizer.decode(seq.tokens), seq.logprobs

    return generate


def tensors(module, values: dict) -> list:
    """Their client's inputs: every tensor [1, 1] (or [B, 1]), numpy types as theirs."""
    out = []
    for name, array in values.items():
        t = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else _triton(array.dtype))
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def _triton(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def their_inputs(prompts: list[str], max_tokens: int, stream: bool, **extra) -> dict:
    values = {
        "text_input": np.array([[p] for p in prompts]).astype(object),
        "max_tokens": np.full((len(prompts), 1), max_tokens, np.int32),
        "stream": np.full((len(prompts), 1), stream, bool),
        "beam_width": np.ones((len(prompts), 1), np.int32),
        "temperature": np.zeros((len(prompts), 1), np.float32),
        "num_return_sequences": np.ones((len(prompts), 1), np.int32),
        "exclude_input_in_output": np.ones((len(prompts), 1), bool),
        "end_id": np.full((len(prompts), 1), -1, np.int32),
    }
    values.update(
        {k: np.full((len(prompts), 1), v, type(v) if not isinstance(v, bool) else bool) for k, v in extra.items()}
    )
    return values


def stream_infer(server, model: str, values: dict, outputs: list[str]) -> list:
    """Their client's call: the streaming RPC, every response until the stream closes."""
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(server.endpoints["grpc"])
    c.start_stream(callback=lambda result, error: results.put(error or result))
    c.async_stream_infer(
        model, tensors(grpcclient, values), outputs=[grpcclient.InferRequestedOutput(o) for o in outputs]
    )
    c.stop_stream()  # waits for the server to close the stream
    c.close()
    got = []
    while not results.empty():
        got.append(results.get())
    return got


@pytest.mark.parametrize("mode", list(MODES))
def test_their_streaming_client_reads_text_and_log_probs(streaming, local, mode):
    outputs = ["text_output", "cum_log_probs", "output_log_probs"]
    results = stream_infer(streaming, mode, their_inputs([PROMPTS[0]], 12, True, return_log_probs=True), outputs)
    assert results and not any(isinstance(r, Exception) for r in results), results
    text, log_probs = "", []
    for r in results:
        assert r.as_numpy("text_output").shape == (1,)
        text += r.as_numpy("text_output")[0].decode("utf-8")
        assert r.as_numpy("cum_log_probs").shape == (1, 1)
        assert r.as_numpy("output_log_probs").shape[:2] == (1, 1)
        log_probs += r.as_numpy("output_log_probs").reshape(-1).tolist()
    expected_text, expected = local(PROMPTS[0], mode, 12)
    assert text == expected_text
    np.testing.assert_allclose(log_probs, expected, rtol=1e-6)  # the engine's own numbers, carried over
    assert float(results[-1].as_numpy("cum_log_probs")[0, 0]) == pytest.approx(sum(expected), rel=1e-5)


def test_self_spec_log_probs_follow_ar(streaming):
    """T = 0: the same tokens; each log prob from self-spec's verify pass, AR's from its decode pass."""
    got = {}
    for mode in ("ar", "self_spec"):
        (r,) = stream_infer(
            streaming,
            mode,
            their_inputs([PROMPTS[1]], 16, False, return_log_probs=True),
            ["text_output", "output_log_probs"],
        )
        got[mode] = (r.as_numpy("text_output")[0], r.as_numpy("output_log_probs").reshape(-1))
    assert got["ar"][0] == got["self_spec"][0]
    assert len(got["ar"][1]) == len(got["self_spec"][1]) == 16
    # the same math in another summation order (tests/test_logprobs.py bounds it); a wrong row is off by >> 0.1
    np.testing.assert_allclose(got["self_spec"][1], got["ar"][1], atol=1e-2, rtol=0)


def test_several_prompts_in_one_request(streaming, local):
    """TensorRT-LLM's --batch-inputs: one response per prompt, each with its batch_index."""
    results = stream_infer(streaming, "ar", their_inputs(PROMPTS, 8, False), ["text_output", "batch_index"])
    assert len(results) == len(PROMPTS) and not any(isinstance(r, Exception) for r in results)
    texts = {int(r.as_numpy("batch_index")[0][0]): r.as_numpy("text_output")[0].decode() for r in results}
    assert texts == {i: local(p, "ar", 8)[0] for i, p in enumerate(PROMPTS)}


def test_the_ensemble_name_and_the_current_input_names(streaming, local):
    values = their_inputs([PROMPTS[2]], 8, False, seed=np.uint64(5), min_tokens=np.int32(1))
    values["return_num_output_tokens"] = np.ones((1, 1), bool)
    (r,) = stream_infer(streaming, "ensemble", values, ["text_output", "sequence_index"])
    assert r.as_numpy("text_output")[0].decode() == local(PROMPTS[2], "self_spec", 8)[0]
    assert r.as_numpy("sequence_index")[0][0] == 0


def test_exclude_input_in_output_false_prepends_the_prompt(streaming, local):
    values = their_inputs([PROMPTS[0]], 6, False)
    values["exclude_input_in_output"] = np.zeros((1, 1), bool)
    (r,) = stream_infer(streaming, "ar", values, ["text_output"])
    assert r.as_numpy("text_output")[0].decode() == PROMPTS[0] + local(PROMPTS[0], "ar", 6)[0]


def http_generate(server, model: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.endpoints['http']}/v2/models/{model}/generate", data=json.dumps(body).encode()
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_seed_is_honoured_and_unknown_inputs_refused(streaming):
    base = {"text_input": PROMPTS[0], "max_tokens": 16, "temperature": 0.9, "end_id": -1}
    texts = [http_generate(streaming, "ar", {**base, "seed": s})[1]["text_output"] for s in (3, 3, 4)]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert http_generate(streaming, "ar", {**base, "random_seed": 3})[1]["text_output"] == texts[0]  # the alias
    status, body = http_generate(streaming, "ar", {**base, "sede": 3})
    assert status == 400 and "sede" in body["error"] and "not an input" in body["error"]
    assert http_generate(streaming, "ar", base)[0] == 200  # and the server keeps serving


def test_a_streaming_repository_refuses_plain_infer(streaming):
    c = grpcclient.InferenceServerClient(streaming.endpoints["grpc"])
    with pytest.raises(grpcclient.InferenceServerException, match="decoupled"):
        c.infer("ar", tensors(grpcclient, their_inputs([PROMPTS[0]], 4, False)))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_plain_repository_answers_plain_infer(plain, local, mode, protocol):
    """end_to_end_test.py's call: client.infer on the ensemble, over both protocols."""
    module = grpcclient if protocol == "grpc" else httpclient
    url = plain.endpoints["grpc"] if protocol == "grpc" else plain.endpoints["http"].removeprefix("http://")
    c = module.InferenceServerClient(url)
    values = their_inputs([PROMPTS[0]], 8, False, return_log_probs=True)
    values["bad_words"] = np.array([[""]], dtype=object)
    values["stop_words"] = np.array([[""]], dtype=object)
    result = c.infer(mode, tensors(module, values))
    text, log_probs = local(PROMPTS[0], mode, 8)
    assert result.as_numpy("text_output")[0].decode() == text
    np.testing.assert_allclose(result.as_numpy("output_log_probs").reshape(-1), log_probs, rtol=1e-6)


def test_a_plain_repository_refuses_streaming_and_several_prompts(plain):
    c = grpcclient.InferenceServerClient(plain.endpoints["grpc"])
    with pytest.raises(grpcclient.InferenceServerException, match="streaming needs a repository"):
        c.infer("ensemble", tensors(grpcclient, their_inputs([PROMPTS[0]], 4, True)))
    with pytest.raises(grpcclient.InferenceServerException, match="needs a streaming repository"):
        c.infer("ar", tensors(grpcclient, their_inputs(PROMPTS[:2], 4, False)))
    assert c.infer("ensemble", tensors(grpcclient, their_inputs([PROMPTS[0]], 2, False))).as_numpy(
        "text_output"
    ).shape == (1,)


def test_a_foreign_cancel_cannot_stop_another_request(streaming):
    """The engine model takes cancel_sequence_id from anyone who can reach it; a guess names nothing."""
    results: queue.Queue = queue.Queue()
    victim = grpcclient.InferenceServerClient(streaming.endpoints["grpc"])
    victim.start_stream(callback=lambda result, error: results.put(error or result))
    victim.async_stream_infer("ar", tensors(grpcclient, their_inputs([PROMPTS[0]], 60, True)))
    first = results.get(timeout=60)
    assert not isinstance(first, Exception)
    attacker = grpcclient.InferenceServerClient(streaming.endpoints["grpc"])
    attacker.start_stream(callback=lambda result, error: None)
    for guess in range(64):  # the engine's own sequence ids are small integers
        cancel = grpcclient.InferInput("cancel_sequence_id", [1, 1], "UINT64")
        cancel.set_data_from_numpy(np.array([[guess]], np.uint64))
        attacker.async_stream_infer("engine", [cancel])
    attacker.stop_stream()
    victim.stop_stream()
    got = [first]
    while not results.empty():
        got.append(results.get())
    assert not any(isinstance(r, Exception) for r in got)
    text = "".join(r.as_numpy("text_output")[0].decode() for r in got)
    assert int(got[-1].as_numpy("num_output_tokens")[0][0]) == 60 and text
