"""triton_repo/: the model repository writer (no server: tests/test_serve.py starts one).

A golden test pins the repository's structure and each model's interface; every config parses
with Triton's protobuf schema; the wiring check finds broken ensembles; bad settings and inputs
are refused before anything is written.
"""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from trimode.cli import main
from trimode.errors import EngineError, InputError
from trimode.passes import Mode
from trimode.triton_repo.configs import Names, ensemble_config
from trimode.triton_repo.settings import RepoSettings
from trimode.triton_repo.wiring import WiringError, check_wiring
from trimode.triton_repo.writer import write_model_repo

GOLDEN = {
    "manifest.json": "file",
    "ar": "ensemble",
    "diffusion": "ensemble",
    "self_spec": "ensemble",
    "quadratic": "ensemble",
    "auto": "ensemble",
    "engine": "python",
    "postprocessing": "python",
    "preprocessing_ar": "python",
    "preprocessing_diffusion": "python",
    "preprocessing_self_spec": "python",
    "preprocessing_quadratic": "python",
    "preprocessing_auto": "python",
}
# TensorRT-LLM's ensemble tensors (tensorrtllm_backend all_models/inflight_batcher_llm/ensemble/config.pbtxt):
# name -> (type, dims), as their clients send and read them; the ones we refuse a value of are in request.py
TRTLLM_INPUTS = {
    "text_input": ("TYPE_STRING", [-1]),  # theirs [1]: [-1] takes every [1] request
    "max_tokens": ("TYPE_INT32", [1]),
    "bad_words": ("TYPE_STRING", [-1]),
    "stop_words": ("TYPE_STRING", [-1]),
    "end_id": ("TYPE_INT32", [1]),
    "pad_id": ("TYPE_INT32", [1]),
    "top_k": ("TYPE_INT32", [1]),
    "top_p": ("TYPE_FP32", [1]),
    "temperature": ("TYPE_FP32", [1]),
    "length_penalty": ("TYPE_FP32", [1]),
    "repetition_penalty": ("TYPE_FP32", [1]),
    "min_tokens": ("TYPE_INT32", [1]),
    "presence_penalty": ("TYPE_FP32", [1]),
    "frequency_penalty": ("TYPE_FP32", [1]),
    "seed": ("TYPE_UINT64", [1]),
    "return_log_probs": ("TYPE_BOOL", [1]),
    "return_context_logits": ("TYPE_BOOL", [1]),
    "return_generation_logits": ("TYPE_BOOL", [1]),
    "return_perf_metrics": ("TYPE_BOOL", [1]),
    "return_num_output_tokens": ("TYPE_BOOL", [1]),
    "beam_width": ("TYPE_INT32", [1]),
    "num_return_sequences": ("TYPE_INT32", [1]),
    "stream": ("TYPE_BOOL", [1]),
    "exclude_input_in_output": ("TYPE_BOOL", [1]),
}
OUR_INPUTS = {
    "random_seed": ("TYPE_UINT64", [1]),  # their older names
    "min_length": ("TYPE_INT32", [1]),
    "block_length": ("TYPE_INT32", [1]),
    "threshold": ("TYPE_FP32", [1]),
    "num_top_log_probs": ("TYPE_INT32", [1]),
}
TRTLLM_OUTPUTS = {
    "text_output": ("TYPE_STRING", [-1]),
    "cum_log_probs": ("TYPE_FP32", [-1]),
    "output_log_probs": ("TYPE_FP32", [-1, -1]),
    "batch_index": ("TYPE_INT32", [1]),
    "sequence_index": ("TYPE_INT32", [1]),
}
OUR_OUTPUTS = {
    "top_log_probs": ("TYPE_FP32", [-1, -1]),
    "top_log_prob_ids": ("TYPE_INT32", [-1, -1]),
    "output_token_ids": ("TYPE_INT32", [-1]),
    "num_input_tokens": ("TYPE_INT32", [1]),
    "num_output_tokens": ("TYPE_INT32", [1]),
    "num_forward_passes": ("TYPE_INT32", [1]),
    "mean_accepted_length": ("TYPE_FP32", [1]),
    "finish_reason": ("TYPE_STRING", [1]),
}


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo_dir(tiny_engine_dir, tmp_path_factory):
    return write_model_repo(tiny_engine_dir, tmp_path_factory.mktemp("repo") / "repo")


def test_golden_structure(repo_dir, tiny_engine_dir):
    found = {p.name: "file" if p.is_file() else None for p in repo_dir.iterdir()}
    for name in found:
        if found[name] is None:
            config = parse(repo_dir / name / "config.pbtxt")
            assert config.name == name
            found[name] = config.platform or config.backend
            files = sorted(str(p.relative_to(repo_dir / name)) for p in (repo_dir / name).rglob("*"))
            assert files == (["1", "config.pbtxt"] if config.platform else ["1", "1/model.py", "config.pbtxt"])
    assert found == GOLDEN
    manifest = json.loads((repo_dir / "manifest.json").read_text())
    engine_manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    assert manifest["stage"] == "repo"
    assert manifest["engine"]["path"] == str(tiny_engine_dir.resolve())
    assert manifest["engine"]["digest_sha256"] == engine_manifest["digest_sha256"]
    assert manifest["ensembles"] == {
        "ar": "ar",
        "diffusion": "diffusion",
        "self-spec": "self_spec",
        "quadratic": "quadratic",
        "auto": "auto",
    }


def test_ensemble_interface(repo_dir, tiny_engine_dir):
    for name in ("ar", "diffusion", "self_spec", "quadratic", "auto"):
        config = parse(repo_dir / name / "config.pbtxt")
        dtype = model_config_pb2.DataType.Name
        assert {t.name: (dtype(t.data_type), list(t.dims)) for t in config.input} == TRTLLM_INPUTS | OUR_INPUTS
        assert {t.name: (dtype(t.data_type), list(t.dims)) for t in config.output} == TRTLLM_OUTPUTS | OUR_OUTPUTS
        assert [t.name for t in config.input if not t.optional] == ["text_input", "max_tokens"]
        assert [s.model_name for s in config.ensemble_scheduling.step] == [
            f"preprocessing_{name}",
            "engine",
            "postprocessing",
        ]
    engine = parse(repo_dir / "engine" / "config.pbtxt")
    assert engine.model_transaction_policy.decoupled  # the default: streaming, as TensorRT-LLM's decoupled_mode
    assert engine.instance_group[0].count == 1 and engine.max_batch_size == 4
    assert engine.parameters["engine_dir"].string_value == str(tiny_engine_dir.resolve())
    assert engine.parameters["threads"].string_value == "1"  # settings.DEFAULT_ENGINE_THREADS
    pre = parse(repo_dir / "preprocessing_self_spec" / "config.pbtxt")
    assert pre.parameters["mode"].string_value == "self-spec"


def test_prefix_modes_and_settings(tiny_engine_dir, tmp_path):
    settings = RepoSettings(
        prefix="nld_",
        modes=("self-spec",),
        max_batch_size=2,
        instances=3,
        max_queue_delay_us=100,
        max_queued_requests=5,
        decoupled=False,
        threads=3,
    )
    out = write_model_repo(tiny_engine_dir, tmp_path / "r", settings)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "nld_engine",
        "nld_postprocessing",
        "nld_preprocessing_self_spec",
        "nld_self_spec",
    ]
    engine = parse(out / "nld_engine" / "config.pbtxt")
    assert engine.dynamic_batching.max_queue_delay_microseconds == 100
    assert engine.parameters["max_queued_requests"].string_value == "5"
    assert not engine.model_transaction_policy.decoupled and engine.parameters["threads"].string_value == "3"
    assert json.loads((out / "manifest.json").read_text())["settings"]["decoupled"] is False
    assert parse(out / "nld_postprocessing" / "config.pbtxt").instance_group[0].count == 3
    assert {parse(p).max_batch_size for p in out.glob("*/config.pbtxt")} == {2}


def _break(config, how: str):
    step = config.ensemble_scheduling.step
    if how == "unfed":  # (the engine's inputs are optional there: a cancel control request sends none)
        del step[2].input_map["response"]
    elif how == "unknown model":
        step[2].model_name = "nope"
    elif how == "unproduced":
        step[1].input_map["input_ids"] = "_nothing"
    elif how == "type":
        config.input[1].data_type = model_config_pb2.TYPE_FP32
    elif how == "mixed origins":
        step[2].input_map["output_ids"] = "max_tokens"


@pytest.mark.parametrize(
    "how, message",
    [
        ("unfed", "required input 'response' is not fed"),
        ("unknown model", "no such model"),
        ("unproduced", "nothing produced before"),
        ("type", "input 'max_tokens' is 8[1], 'max_tokens' is 11[1]"),
        ("mixed origins", "come from different decoupled models"),
    ],
)
def test_wiring_check_finds(repo_dir, how, message):
    configs = {p.parent.name: parse(p) for p in repo_dir.glob("*/config.pbtxt")}
    check_wiring(configs)  # the written repository is wired
    _break(configs["ar"], how)
    with pytest.raises(WiringError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_wiring(configs)


def test_ensemble_config_alone_is_incomplete():
    names = Names("")
    from trimode.passes import Mode

    with pytest.raises(WiringError, match="no such model"):
        check_wiring({"ar": ensemble_config(names, Mode.AR, 4)})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prefix": "a/b"}, "prefix"),
        ({"modes": ("ar", "ar")}, "modes"),
        ({"modes": ("beam",)}, "modes"),
        ({"instances": 0}, "instances"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queued_requests": 0}, "max_queued_requests"),
        ({"decoupled": "no"}, "decoupled"),
        ({"threads": -1}, "threads"),
        (
            {"modes": ("ar",), "ensemble_mode": Mode.SELF_SPEC},
            "ensemble_mode: expected one of the repository's modes \\(ar\\), got 'self-spec'",
        ),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        RepoSettings(**kwargs)


def test_refuses_non_engine_and_existing_output(tiny_dir, tiny_engine_dir, repo_dir, tmp_path):
    with pytest.raises(EngineError, match="not an engine dir"):
        write_model_repo(tiny_dir, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    from trimode.errors import OutputError

    with pytest.raises(OutputError, match="--force"):
        write_model_repo(tiny_engine_dir, repo_dir)
    write_model_repo(tiny_engine_dir, repo_dir, force=True)  # a previous repo output is replaced


def test_cli_repo(runner, tiny_engine_dir, tmp_path):
    result = runner.invoke(
        main, ["repo", str(tiny_engine_dir), "--out", str(tmp_path / "r"), "--modes", "ar", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ensembles"] == {"ar": "ar"}
    result = runner.invoke(main, ["repo", str(tiny_engine_dir), "--out", str(tmp_path / "s"), "--modes", "ar,beam"])
    assert result.exit_code == 2 and "expected distinct modes" in result.output
