"""The metrics add up (triton_repo/metrics.py states the invariants), on the real tritonserver.

A mix of requests, each kind counted where it ends: good ones in every mode (streamed and whole,
self-spec cut by max_tokens mid-cycle), one the engine refuses, ones preprocessing refuses (an
empty prompt; an unknown input over HTTP), and one Triton itself refuses (an unknown gRPC input).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import defaultdict

import pytest

from trimode.triton_repo import client
from trimode.triton_repo.client import RemoteError
from trimode.triton_repo.server import Ports, TritonServer
from trimode.triton_repo.writer import write_model_repo

GOOD = [  # (mode, max_tokens, streamed)
    ("ar", 7, False),
    ("ar", 1, True),
    ("diffusion", 9, True),
    ("self_spec", 5, False),  # block 4: the second cycle is cut after one token
    ("self_spec", 13, True),
    ("self_spec", 2, False),
]
MODE_LABEL = {"ar": "ar", "diffusion": "diffusion", "self_spec": "self-spec"}


@pytest.fixture(scope="module")
def server(tiny_engine_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    repo = write_model_repo(tiny_engine_dir, root / "repo")
    with TritonServer(repo, ports=Ports.free(), log_path=root / "tritonserver.log") as s:
        yield s


def scrape(server) -> dict[str, dict[tuple, float]]:
    """family name -> {sorted label items: value}."""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for line in urllib.request.urlopen(server.endpoints["metrics"]).read().decode().splitlines():
        if not line.startswith("trimode_"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        items = tuple(sorted(tuple(kv.split("=", 1)) for kv in labels.rstrip("}").split(",") if kv))
        out[name][tuple((k, v.strip('"')) for k, v in items)] = float(value)
    return out


def total(metrics, family: str, **labels) -> float:
    return sum(v for key, v in metrics[family].items() if all((k, str(x)) in key for k, x in labels.items()))


def test_every_request_is_counted_once_and_the_counts_add_up(server):
    grpc_url, http_url = f"127.0.0.1:{server.ports.grpc}", f"127.0.0.1:{server.ports.http}"
    generated = defaultdict(int)
    for mode, max_tokens, streamed in GOOD:
        inputs = {"text_input": "def f(x):", "max_tokens": max_tokens, "end_id": -1}
        if streamed:
            responses = list(client.stream_grpc(grpc_url, mode, inputs))
            generated[mode] += responses[-1]["num_output_tokens"]
        else:
            generated[mode] += client.infer(grpc_url, mode, inputs)["num_output_tokens"]
    with pytest.raises(RemoteError, match="top_k"):  # refused by the engine model
        client.infer(grpc_url, "ar", {"text_input": "x", "max_tokens": 3, "top_k": 5})
    with pytest.raises(RemoteError, match="empty"):  # refused by preprocessing
        client.infer(grpc_url, "diffusion", {"text_input": "", "max_tokens": 3})
    request = urllib.request.Request(  # an unknown input over HTTP: refused by preprocessing too
        f"http://{http_url}/v2/models/ar/generate",
        data=json.dumps({"text_input": "x", "max_tokens": 2, "nope": 1}).encode(),
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request)
    import numpy as np
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(grpc_url)
    bogus = grpcclient.InferInput("nope", [1, 1], "INT32")
    bogus.set_data_from_numpy(np.zeros((1, 1), np.int32))
    c.start_stream(callback=lambda result, error: None)
    c.async_stream_infer("ar", [bogus])  # Triton refuses it before any model of ours
    c.stop_stream()

    m = scrape(server)
    assert total(m, "trimode_requests_total") == len(GOOD)
    assert total(m, "trimode_requests_finished_total") == len(GOOD)  # idle: everything admitted finished
    assert (
        total(m, "trimode_requests_rejected_total")
        == 1
        == total(m, "trimode_requests_rejected_total", reason="invalid")
    )
    assert total(m, "trimode_preprocessing_rejected_total") == 2
    for mode in MODE_LABEL:
        label = MODE_LABEL[mode]
        count = sum(1 for g in GOOD if g[0] == mode)
        assert total(m, "trimode_requests_total", mode=label) == count
        assert total(m, "trimode_generated_tokens_total", mode=label) == generated[mode]
        assert total(m, "trimode_time_to_first_token_seconds_count", mode=label) == count
        assert total(m, "trimode_queue_time_seconds_count", mode=label) == count
        many = sum(1 for g in GOOD if g[0] == mode and g[1] > 1)
        assert total(m, "trimode_inter_token_latency_seconds_count", mode=label) == many
    accepted = total(m, "trimode_accepted_tokens_total", mode="self-spec")
    assert 0 < accepted <= generated["self_spec"] - 3  # each request's first token is its prefill's
    assert total(m, "trimode_kv_slots") == 4  # the tiny deploy's --max-batch-size
    assert total(m, "trimode_batch_occupancy", mode="all") == 0 and total(m, "trimode_requests_waiting") == 0


def test_the_kv_pool_and_its_prefix_cache_are_reported(server, tiny_engine_dir):
    """The pool's size as the engine dir records it, blocks in use back to 0 when idle, and a prompt
    sent twice found in the prefix cache the second time (deltas: the test above may run first)."""
    settings = json.loads((tiny_engine_dir / "manifest.json").read_text())["settings"]
    grpc_url = f"127.0.0.1:{server.ports.grpc}"
    prompt = "import os\nimport sys\nimport json\nimport time\n\n\ndef main(argv):\n    return argv[1:]\n"
    before = scrape(server)
    for _ in range(2):
        client.infer(grpc_url, "ar", {"text_input": prompt, "max_tokens": 3, "end_id": -1})
    m = scrape(server)
    assert total(m, "trimode_kv_blocks") == settings["num_kv_blocks"]
    assert total(m, "trimode_kv_block_size") == settings["kv_block_size"]
    assert total(m, "trimode_kv_cache_bytes") > 0
    assert total(m, "trimode_kv_blocks_used") == 0  # idle: nothing held (cached blocks are free)
    assert total(m, "trimode_preemptions_total") == 0
    queried = total(m, "trimode_prefix_cache_queried_tokens_total") - total(
        before, "trimode_prefix_cache_queried_tokens_total"
    )
    hits = total(m, "trimode_prefix_cache_hit_tokens_total") - total(before, "trimode_prefix_cache_hit_tokens_total")
    assert queried >= 2 * settings["kv_block_size"] + 1  # both prompts looked up, each longer than a block
    assert hits >= settings["kv_block_size"] and hits % settings["kv_block_size"] == 0  # the second found blocks
