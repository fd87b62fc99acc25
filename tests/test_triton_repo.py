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
from trimode.triton_repo.configs import Names, ensemble_config
from trimode.triton_repo.settings import RepoSettings
from trimode.triton_repo.wiring import WiringError, check_wiring
from trimode.triton_repo.writer import write_model_repo

GOLDEN = {
    "manifest.json": "file",
    "ar": "ensemble",
    "diffusion": "ensemble",
    "self_spec": "ensemble",
    "engine": "python",
    "postprocessing": "python",
    "preprocessing_ar": "python",
    "preprocessing_diffusion": "python",
    "preprocessing_self_spec": "python",
}
ENSEMBLE_INPUTS = {  # TensorRT-LLM's ensemble tensors (name -> type), ours last
    "text_input": "TYPE_STRING",
    "max_tokens": "TYPE_INT32",
    "bad_words": "TYPE_STRING",
    "stop_words": "TYPE_STRING",
    "end_id": "TYPE_INT32",
    "pad_id": "TYPE_INT32",
    "top_k": "TYPE_INT32",
    "top_p": "TYPE_FP32",
    "temperature": "TYPE_FP32",
    "length_penalty": "TYPE_FP32",
    "repetition_penalty": "TYPE_FP32",
    "min_length": "TYPE_INT32",
    "presence_penalty": "TYPE_FP32",
    "frequency_penalty": "TYPE_FP32",
    "random_seed": "TYPE_UINT64",
    "return_log_probs": "TYPE_BOOL",
    "return_context_logits": "TYPE_BOOL",
    "return_generation_logits": "TYPE_BOOL",
    "beam_width": "TYPE_INT32",
    "num_return_sequences": "TYPE_INT32",
    "stream": "TYPE_BOOL",
    "exclude_input_in_output": "TYPE_BOOL",
    "block_length": "TYPE_INT32",
    "threshold": "TYPE_FP32",
}
ENSEMBLE_OUTPUTS = {
    "text_output": "TYPE_STRING",
    "num_input_tokens": "TYPE_INT32",
    "num_output_tokens": "TYPE_INT32",
    "num_forward_passes": "TYPE_INT32",
    "mean_accepted_length": "TYPE_FP32",
    "finish_reason": "TYPE_STRING",
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
    assert manifest["ensembles"] == {"ar": "ar", "diffusion": "diffusion", "self-spec": "self_spec"}


def test_ensemble_interface(repo_dir, tiny_engine_dir):
    for name in ("ar", "diffusion", "self_spec"):
        config = parse(repo_dir / name / "config.pbtxt")
        dtype = model_config_pb2.DataType.Name
        assert {t.name: dtype(t.data_type) for t in config.input} == ENSEMBLE_INPUTS
        assert {t.name: dtype(t.data_type) for t in config.output} == ENSEMBLE_OUTPUTS
        assert [t.name for t in config.input if not t.optional] == ["text_input", "max_tokens"]
        assert [s.model_name for s in config.ensemble_scheduling.step] == [
            f"preprocessing_{name}",
            "engine",
            "postprocessing",
        ]
    engine = parse(repo_dir / "engine" / "config.pbtxt")
    assert engine.model_transaction_policy.decoupled
    assert engine.instance_group[0].count == 1 and engine.max_batch_size == 4
    assert engine.parameters["engine_dir"].string_value == str(tiny_engine_dir.resolve())
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
    assert parse(out / "nld_postprocessing" / "config.pbtxt").instance_group[0].count == 3
    assert {parse(p).max_batch_size for p in out.glob("*/config.pbtxt")} == {2}


def _break(config, how: str):
    step = config.ensemble_scheduling.step
    if how == "unfed":  # (the engine's inputs are optional there: a cancel control request sends none)
        del step[2].input_map["prefix_length"]
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
        ("unfed", "required input 'prefix_length' is not fed"),
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
