"""Bad input, generated systematically: every config.json field corrupted in turn, every option out of
range, every kind of bad output path; each case is one `Error:` line, nothing written (the `refused`
fixture in conftest checks the whole promise)."""

from __future__ import annotations

import json
import shutil

import pytest

from trimode.make_checkpoint import TINY_SPEC

NAN, INF = float("nan"), float("inf")


class _Delete:
    """The key is removed (a repr that is the same in every process: pytest-xdist compares test ids)."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()

# --- config.json: each key with values of the wrong type, out of range, non-finite ---------------
REQUIRED_COUNTS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
COUNTS = [
    *REQUIRED_COUNTS,
    "num_key_value_heads",
    "max_position_embeddings",
    "block_size",
    "rope_parameters.original_max_position_embeddings",
]
BAD_COUNTS = [0, -1, 1.5, "8", True, [], {}, NAN, 2**70]
# key -> the nearest bad value below its range (all of them also get BAD_NUMBERS)
NUMBERS = {
    "rms_norm_eps": 0,
    "rope_parameters.rope_theta": 1,
    "rope_parameters.factor": 0.5,
    "rope_parameters.beta_fast": 0,
    "rope_parameters.beta_slow": 0,
    "rope_parameters.mscale": 0,
    "rope_parameters.mscale_all_dim": 0,
    "rope_parameters.attention_factor": 0,
    "rope_parameters.llama_4_scaling_beta": -0.5,
}
BAD_NUMBERS = [NAN, INF, -INF, -1, "1e-5", True, [], {}, 1e300]
TOKENS = ["mask_token_id", "eos_token_id", "bos_token_id", "pad_token_id"]
BAD_TOKENS = [-1, TINY_SPEC.vocab_size, 2**70, 1.0, "2", True, {}, NAN]
OTHERS = [
    ("model_type", "llama"),
    ("model_type", None),
    ("model_type", 3),
    ("model_type", DELETE),
    ("hidden_act", "gelu"),
    ("hidden_act", 3),
    ("torch_dtype", "int4"),
    ("torch_dtype", 16),
    ("torch_dtype", None),
    ("tie_word_embeddings", True),
    ("rope_parameters", "yarn"),
    ("rope_parameters", 3),
    ("rope_parameters", []),
    ("rope_parameters.rope_type", "linear"),
    ("rope_parameters.rope_type", 3),
    ("rope_parameters.rope_type", None),
    ("rope_parameters.truncate", "yes"),
    ("rope_parameters.truncate", 1),
    ("rope_parameters.rope_theta", DELETE),
    ("eos_token_id", []),
    ("eos_token_id", [2, 384]),
    ("eos_token_id", [[2]]),
    ("mask_token_id", None),
    ("eos_token_id", None),
    ("head_dim", 0),
    ("head_dim", -2),
    ("head_dim", 3),
    ("head_dim", 17),
    ("head_dim", 2.0),
    ("head_dim", "16"),
    ("head_dim", True),
    ("head_dim", 2048),
    ("head_dim", NAN),
]

CONFIG_CASES = (
    [(k, v) for k in COUNTS for v in BAD_COUNTS]
    + [(k, v) for k in REQUIRED_COUNTS for v in (None, DELETE)]
    + [(k, v) for k, low in NUMBERS.items() for v in (low, *BAD_NUMBERS)]
    + [(k, v) for k in TOKENS for v in BAD_TOKENS]
    + OTHERS
)


def _set(config: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        config = config[p]
    if value is DELETE:
        config.pop(leaf)
    else:
        config[leaf] = value


def _copy(src, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(src, d)
    (tmp_path / "calib.txt").write_text("calibration text " * 200)
    return d


def _command(name: str, ck, tmp_path) -> list:
    return {
        "generate": ["generate", "--checkpoint", ck, "--max-new-tokens", 2, "hello"],
        "eval": ["eval", ck, "--num-prompts", 1, "--prompt-len", 4, "--max-new-tokens", 2, "--block-lengths", 2],
        "quantize": ["quantize", ck, "--out", tmp_path / "out", "--calib-data", tmp_path / "calib.txt"],
    }[name]


def _per_command(cases: list) -> list:
    """Every case through generate; every 8th also through eval and quantize (same reader)."""
    return [
        pytest.param(cmd, *case, id=f"{cmd}-{i}-{case[0]}={case[1]!r}"[:90])
        for i, case in enumerate(cases)
        for cmd in ("generate", *(("eval", "quantize") if i % 8 == 0 else ()))
    ]


@pytest.mark.parametrize("command, key, value", _per_command(CONFIG_CASES))
def test_corrupt_config_value(refused, tiny_dir, tmp_path, command, key, value):
    ck = _copy(tiny_dir, tmp_path)
    config = json.loads((ck / "config.json").read_text())
    _set(config, key, value)
    (ck / "config.json").write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them
    leaf = key.split(".")[-1]
    error = refused(_command(command, ck, tmp_path), tmp_path, "config.json").error
    assert f"{leaf}'" in error or f"{leaf}=" in error


CONFIG_FILES = [b"", b"{", b"[]", b"3", b"null", b'"config"', b"\xff\xfe{}", b"[" * 100_000, b"NaN", None]


@pytest.mark.parametrize("command", ["generate", "eval", "quantize"])
@pytest.mark.parametrize("content", CONFIG_FILES, ids=lambda c: repr(c)[:20])
def test_config_file_that_is_not_a_config(refused, tiny_dir, tmp_path, command, content):
    ck = _copy(tiny_dir, tmp_path)
    (ck / "config.json").unlink()
    if content is None:
        (ck / "config.json").mkdir()
    else:
        (ck / "config.json").write_bytes(content)
    refused(_command(command, ck, tmp_path), tmp_path, "config.json")


# --- options: out of range, wrong type, not text ---------------------------------------------------
GENERATE_OPTIONS = [
    (["--seed", -1], "--seed"),
    (["--seed", 2**63], "--seed"),
    (["--seed", 2**64 + 1], "--seed"),
    (["--seed", "x"], "--seed"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--device", "cpu:0"], "--device"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", -1], "--temperature"),
    (["--threshold", "nan"], "--threshold"),
    (["--threshold", 1.5], "--threshold"),
    (["--threshold", -0.1], "--threshold"),
    (["--max-new-tokens", 0], "--max-new-tokens"),
    (["--max-new-tokens", -5], "--max-new-tokens"),
    (["--max-new-tokens", "x"], "--max-new-tokens"),
    (["--block-length", 0], "--block-length"),
    (["--prefill-chunk", 0], "--prefill-chunk"),
    (["--mode", "beam"], "--mode"),
]


@pytest.mark.parametrize("args, option", GENERATE_OPTIONS, ids=lambda a: str(a))
@pytest.mark.parametrize("as_json", [False, True])
def test_generate_option_out_of_range(refused, tiny_dir, tmp_path, args, option, as_json):
    json_flag = ["--json"] if as_json else []
    refused(["generate", "--checkpoint", tiny_dir, *args, *json_flag, "hello"], tmp_path, f"'{option}'", exit_code=2)


@pytest.mark.parametrize(
    "prompts, message, code",
    [
        (["caf\udce9"], "prompt 1 is not valid UTF-8", 2),  # the bytes b"caf\xe9" on a UTF-8 command line
        (["ok", "\udcff\udcfe"], "prompt 2 is not valid UTF-8", 2),
        ([""], "the prompt is empty", 1),
    ],
)
def test_generate_prompt_that_is_not_text(refused, tiny_dir, tmp_path, prompts, message, code):
    refused(["generate", "--checkpoint", tiny_dir, *prompts], tmp_path, message, exit_code=code)


def test_generate_length_past_the_model_names_the_option(refused, tiny_dir, tmp_path):
    refused(
        ["generate", "--checkpoint", tiny_dir, "--max-new-tokens", 10**9, "hello"],
        tmp_path,
        "--max-new-tokens exceed max_position_embeddings",
    )


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--num-prompts", 0], "'--num-prompts'", 2),
        (["--block-lengths", "a,b"], "'--block-lengths'", 2),
        (["--block-lengths", "0,4"], "'--block-lengths'", 2),
        (["--block-lengths", ""], "'--block-lengths'", 2),
        (["--device", "tpu"], "'--device'", 2),
        (["--against", "/nonexistent/ck"], "not a directory", 1),
        (["--batch-size", 0], "'--batch-size'", 2),
        (["--max-new-tokens", -1], "'--max-new-tokens'", 2),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_eval_bad_option(refused, tiny_dir, tmp_path, args, message, code, as_json):
    json_flag = ["--json"] if as_json else []
    refused(["eval", tiny_dir, *args, *json_flag], tmp_path, message, exit_code=code)


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--calib-samples", 0], "'--calib-samples'", 2),
        (["--calib-seq-len", 1], "'--calib-seq-len'", 2),
        (["--kv-cache", "int8"], "'--kv-cache'", 2),
        (["--calib-data", "/nonexistent.txt"], "--calib-data", 1),
        (["--calib-data", "EMPTY"], "no text to calibrate on", 1),
        (["--calib-data", "calib.txt", "--calib-seq-len", 4000], "fewer than --calib-seq-len", 1),
        (["--calib-data", "calib.txt", "--calib-seq-len", 100_000], "max_position_embeddings 4096", 1),
    ],
)
def test_quantize_bad_option(refused, tiny_dir, tmp_path, args, message, code):
    ck = _copy(tiny_dir, tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    args = [{"EMPTY": tmp_path / "empty.txt", "calib.txt": tmp_path / "calib.txt"}.get(a, a) for a in args]
    refused(["quantize", ck, "--out", tmp_path / "out", *args], tmp_path, message, exit_code=code)


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--hidden-size", 24], "'--hidden-size'", 2),
        (["--hidden-size", 8], "'--hidden-size'", 2),
        (["--hidden-size", 10**6], "'--hidden-size'", 2),
        (["--num-layers", 0], "'--num-layers'", 2),
        (["--vocab-size", 10], "'--vocab-size'", 2),
        (["--shards", 100], "'--shards'", 2),
        (["--shards", 0], "'--shards'", 2),
        (["--seed", -1], "'--seed'", 2),
        (["--seed", 2**64], "'--seed'", 2),
        (["--block-size", 0], "'--block-size'", 2),
    ],
)
def test_make_checkpoint_bad_option(refused, tmp_path, args, message, code):
    refused(["make-checkpoint", "--random", "--out", tmp_path / "out", *args], tmp_path, message, exit_code=code)


def test_make_checkpoint_without_random_is_a_usage_error(refused, tmp_path):
    refused(["make-checkpoint", "--out", tmp_path / "out"], tmp_path, "'--random'", exit_code=2)


# --- output paths: both writing commands -----------------------------------------------------------
OUTPUTS = [  # (--out: a literal in quotes, CWD, or a path under tmp_path; --force; the error)
    ("''", True, "not a usable output directory"),
    ("'.'", True, "not a usable output directory"),
    ("'/'", True, "not a usable output directory"),
    ("'./'", True, "not a usable output directory"),
    ("'../cwd'", True, "refusing to write"),
    ("CWD", True, "refusing to write"),
    ("mine", False, "exists and is not empty"),
    ("mine", True, "not a trimode output"),
    ("other-stage", True, "only replaces a previous"),
    ("other-stage", False, "exists and is not empty"),
    ("a-file", True, "exists and is not a directory"),
    ("a-file/out", False, "its parent is a file"),
    ("a-file/x/out", False, "lies under the file"),
    ("'/sys/trimode-out'", False, "cannot write in /sys"),
    ("'/proc/trimode-out'", False, "cannot write in /proc"),
]
INPUT_OUTPUTS = [  # quantize reads a checkpoint: its output may not overlap it
    ("ck", True, "the output is the input"),
    ("ck", False, "the output is the input"),
    ("ck/sub", False, "lies inside the input"),
    ("ck/sub/deeper", True, "lies inside the input"),
    ("ck/linear_spec_lora/..", True, "the output is the input"),
    (".", True, "contains the input"),
    ("calib.txt", True, "calib.txt: the output is the input"),
]


def _params(table, commands):
    return [
        pytest.param(command, *row, id=f"{command}-{row[0]}{'-force' * row[1]}")
        for command in commands
        for row in table
    ]


@pytest.mark.parametrize(
    "command, out, force, message",
    _params(OUTPUTS, ["quantize", "make-checkpoint"]) + _params(INPUT_OUTPUTS, ["quantize"]),
)
def test_bad_output_path(refused, tiny_dir, tmp_path, monkeypatch, command, out, force, message):
    ck = _copy(tiny_dir, tmp_path)
    args = ["quantize", ck, "--calib-data", "calib.txt"] if command == "quantize" else ["make-checkpoint", "--random"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not ours")
    (tmp_path / "other-stage").mkdir()
    stage = "make-checkpoint" if command == "quantize" else "quantize"
    (tmp_path / "other-stage" / "manifest.json").write_text(json.dumps({"stage": stage}))
    (tmp_path / "a-file").write_text("a file")
    (tmp_path / "out.tmp").mkdir()  # quantize used to delete OUT.tmp
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "precious.txt").write_text("x")  # make-checkpoint --out "" --force deleted the cwd
    monkeypatch.chdir(tmp_path / "cwd")
    args = [tmp_path / a if a == "calib.txt" else a for a in args]
    target = out[1:-1] if out.startswith("'") else tmp_path / "cwd" if out == "CWD" else tmp_path / out
    result = refused([*args, "--out", target, *(["--force"] if force else [])], tmp_path, message)
    assert "--out" in result.error
    assert "calibrate" not in result.stderr  # refused before any work


def test_quantize_refuses_an_output_holding_its_input_with_force(refused, tiny_dir, tmp_path):
    """`quantize PARENT/ck --out PARENT --force` used to delete the input and its neighbours."""
    parent = tmp_path / "parent"
    parent.mkdir()
    shutil.copytree(tiny_dir, parent / "ck")
    (parent / "neighbour.txt").write_text("x")
    refused(["quantize", parent / "ck", "--out", parent, "--force"], tmp_path, "contains the input")


# --- silent failures: --json is strict JSON or an error, never NaN -------------------------------
def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_json_output_is_strict_even_for_non_finite_results(runner, tiny_dir, tmp_path, command):
    """Weights that parse but are NaN (eval used to print `NaN`, which no JSON parser accepts)."""
    from safetensors.torch import load_file, save_file

    from trimode.cli import main

    ck = _copy(tiny_dir, tmp_path)
    state = load_file(str(ck / "model.safetensors"))
    state["diffusion_head.weight"].fill_(float("nan"))
    save_file(state, str(ck / "model.safetensors"))
    args = (
        [
            "eval",
            ck,
            "--num-prompts",
            1,
            "--prompt-len",
            8,
            "--max-new-tokens",
            2,
            "--block-lengths",
            2,
            "--max-ppl-windows",
            1,
        ]
        if command == "eval"
        else ["generate", "--checkpoint", ck, "--max-new-tokens", 2, "hello"]
    )
    result = runner.invoke(main, [*map(str, args), "--json"])
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        report = json.loads(result.stdout, parse_constant=_reject_constant)
        if command == "eval":
            assert report["perplexity"] is None  # non-finite numbers are written as null
    else:  # or the run stops with an error (a decoder that refuses non-finite logits)
        assert result.exit_code == 1 and result.stdout == ""
        assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1


# --- --help states the ranges the checks enforce -----------------------------------------------------
def _range_cases():
    import click

    from trimode.cli import main

    for command in main.commands.values():
        for param in command.params:
            if isinstance(param.type, (click.IntRange, click.FloatRange)) and isinstance(param, click.Option):
                step = 1 if isinstance(param.type, click.IntRange) else 0.5
                for bound, outside in ((param.type.min, -step), (param.type.max, step)):
                    if bound is not None:
                        yield pytest.param(
                            command.name,
                            param.opts[0],
                            param.type,
                            bound + outside,
                            id=f"{command.name}{param.opts[0]}={bound + outside}",
                        )


@pytest.mark.parametrize("command, option, kind, value", list(_range_cases()))
def test_help_shows_each_range_and_the_check_enforces_it(
    refused, runner, tiny_dir, tmp_path, command, option, kind, value
):
    from trimode.cli import main

    fixed = {
        "generate": ["generate", "--checkpoint", tiny_dir, "hello"],
        "eval": ["eval", tiny_dir],
        "quantize": ["quantize", tiny_dir, "--out", tmp_path / "out"],
        "make-checkpoint": ["make-checkpoint", "--random", "--out", tmp_path / "out"],
        "train-draft": ["train-draft", tiny_dir, "--out", tmp_path / "out"],
        "build": ["build", tiny_dir, "--out", tmp_path / "out"],
        "repo": ["repo", tiny_dir, "--out", tmp_path / "out"],
        "serve": ["serve", tiny_dir],
        "deploy": ["deploy", tiny_dir, "--out", tmp_path / "out"],
        "bench": ["bench", "--engine", tiny_dir],
    }[command]
    help_text = " ".join(runner.invoke(main, [command, "--help"]).stdout.split())
    assert kind._describe_range() in help_text
    refused([*fixed, option, value], tmp_path, f"Invalid value for '{option}'", exit_code=2)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_url_with_no_server(refused, tmp_path, protocol):
    """gRPC reports a refused connection either from the send or through the stream's callback (a
    race): both are the same one-line error, every time."""
    from trimode.triton_repo.server import Ports

    for _ in range(5):
        port = Ports.free().grpc
        refused(
            ["generate", "--url", f"127.0.0.1:{port}", "--protocol", protocol, "x"],
            tmp_path,
            f"--url 127.0.0.1:{port}: no Triton server answers there over {protocol} (",
        )
