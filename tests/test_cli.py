"""The command line: output, --json, and one-line errors (never a traceback) for bad input."""

from __future__ import annotations

import json
import shutil

import click
import pytest

from trimode.cli import main
from trimode.errors import Interrupted


def invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "self-spec"])
def test_generate_json(runner, tiny_dir, mode):
    result = invoke(
        runner,
        "generate",
        "--checkpoint",
        tiny_dir,
        "--mode",
        mode,
        "--max-new-tokens",
        9,
        "--block-length",
        4,
        "--ignore-eos",
        "--json",
        "def f(x):",
        "The quick",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["mode"] == mode and out["batch_size"] == 2 and out["num_generated"] == 18
    for r in out["results"]:
        assert len(r["tokens"]) == 9 and r["finish_reason"] == "length"
        assert r["stats"]["num_passes"] >= 1 and isinstance(r["text"], str)


def test_generate_self_spec_matches_ar_text(runner, tiny_adapter_dir):
    def text(mode):
        result = invoke(
            runner,
            "generate",
            "--checkpoint",
            tiny_adapter_dir,
            "--mode",
            mode,
            "--json",
            "--max-new-tokens",
            20,
            "The quick brown",
        )
        return json.loads(result.stdout)["results"][0]["tokens"]

    assert text("self-spec") == text("ar")


def test_generate_streams_text_and_prints_statistics(runner, tiny_dir):
    result = invoke(
        runner,
        "generate",
        "--checkpoint",
        tiny_dir,
        "--mode",
        "self-spec",
        "--max-new-tokens",
        5,
        "--ignore-eos",
        "hello",
    )
    assert result.exit_code == 0
    assert result.stdout.startswith("hello")
    assert "5 tokens" in result.stderr and "tokens/pass" in result.stderr


def test_make_checkpoint_then_generate(runner, tmp_path):
    out = tmp_path / "ck"
    result = invoke(runner, "make-checkpoint", "--random", "--out", out, "--draft-adapter", "--shards", 2)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").is_file() and (out / "linear_spec_lora").is_dir()
    again = invoke(runner, "make-checkpoint", "--random", "--out", out)
    assert again.exit_code == 1 and "--force" in again.output
    result = invoke(runner, "generate", "--checkpoint", out, "--max-new-tokens", 3, "--json", "x")
    assert result.exit_code == 0 and json.loads(result.stdout)["results"][0]["tokens"]


def _broken(tiny_dir, tmp_path, what):
    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    config = json.loads((d / "config.json").read_text())
    if what == "missing config":
        (d / "config.json").unlink()
    elif what == "missing tokenizer":
        (d / "tokenizer.json").unlink()
    elif what == "bad json":
        (d / "config.json").write_text("{not json")
    else:
        key, value = what
        config[key] = value
        (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize(
    "broken, args, message",
    [
        ("missing config", [], "no config.json"),
        ("bad json", [], "not valid JSON"),
        (("model_type", "mistral"), [], "'model_type'"),
        (("hidden_size", "big"), [], "'hidden_size': expected an integer in [1, 131072], got 'big'"),
        (("intermediate_size", 7), [], "shape"),
        ("missing tokenizer", [], "no tokenizer.json"),
        (None, ["--block-length", 0], "'--block-length': 0 is not in the range 1<=x<=65536"),
        (None, ["--max-new-tokens", 0], "'--max-new-tokens': 0 is not in the range x>=1"),
        (None, ["--temperature", -1], "'--temperature': -1.0 is not in the range x>=0"),
        (None, ["--threshold", 2], "'--threshold': '2' is not in the range 0<=x<=1"),
        (None, ["--threshold", "high"], "neither a number nor 'none'"),
        (None, ["--mode", "beam"], "'beam' is not one of"),
    ],
)
def test_bad_input_is_one_line_error(runner, tiny_dir, tmp_path, broken, args, message):
    d = _broken(tiny_dir, tmp_path, broken) if broken else tiny_dir
    result = runner.invoke(main, ["generate", "--checkpoint", str(d), *map(str, args), "hello"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.output


def test_empty_prompt_and_missing_checkpoint(runner, tiny_dir, tmp_path):
    result = runner.invoke(main, ["generate", "--checkpoint", str(tiny_dir), ""])
    assert result.exit_code == 1 and result.output.strip() == "Error: the prompt is empty"
    result = runner.invoke(main, ["generate", "--checkpoint", str(tmp_path / "nope"), "x"])
    assert result.exit_code == 1 and "not a directory" in result.output


def test_help_names_every_mode(runner):
    result = invoke(runner, "generate", "--help")
    assert result.exit_code == 0
    for word in ("ar", "diffusion", "self-spec", "--threshold", "--json"):
        assert word in result.output


@pytest.mark.parametrize("where", ["parsing", "before the command", "after the command"])
@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), 130), (Interrupted(15), 143)])
def test_an_interrupt_in_clicks_own_code_exits_like_one_in_the_command(runner, monkeypatch, where, error, status):
    """click's main turns Ctrl-C outside the command (entering or closing the top context) into
    "Aborted!" and exit 1; trimode's is 128 + signum wherever it lands."""
    name = {
        "parsing": "parse_args",
        "before the command": "__enter__",
        "after the command": "_close_with_exception_info",
    }[where]
    owner = click.Command if where == "parsing" else click.Context
    original = getattr(owner, name)

    def interrupt(self, *args, **kwargs):
        if where == "parsing" or (self.parent is None and self._depth == 0):
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, interrupt)
    result = runner.invoke(main, ["inspect", "--help"])
    assert result.exit_code == status
    assert result.stderr.strip() == "Error: interrupted" and "Aborted" not in result.output


def test_a_ctrl_c_that_a_child_process_dies_of_first_exits_130(runner, tiny_dir, tmp_path, monkeypatch):
    """Ctrl-C signals the whole process group: during a build the C++ compiler can die of it and its
    failure surface before (or instead of) Python's KeyboardInterrupt. That is still an interrupt:
    exit 130 and one Error line, not a traceback and exit 1."""
    import os
    import signal
    import subprocess
    import time

    import trimode.builder

    def build_engine(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C, as this process gets it
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # swallowed on its way, as a compile pool's wait may do
        raise subprocess.CalledProcessError(-signal.SIGINT, ["g++"])  # the compiler, killed by the same Ctrl-C

    monkeypatch.setattr(trimode.builder, "build_engine", build_engine)
    # a fresh interpreter's handler (a test run before this one in the same worker may have left another)
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = runner.invoke(main, ["build", str(tiny_dir), "--out", str(tmp_path / "engine")])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after the command
    finally:
        signal.signal(signal.SIGINT, found)
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "Error: interrupted" and "Traceback" not in result.output


def test_a_second_ctrl_c_lets_the_first_ones_cleanup_finish(runner, tiny_dir, tmp_path, monkeypatch):
    """A double press (or `timeout -s INT`, which signals the process and then its group) must not cut
    the first Ctrl-C's cleanup short: raised inside a `finally`, the second left `trimode bench`'s
    engine thread in a C++ pass at exit ("terminate called", exit 134)."""
    import os
    import signal

    import trimode.builder

    cleaned = []

    def build_engine(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # the second press, while the cleanup runs
            cleaned.append(True)

    monkeypatch.setattr(trimode.builder, "build_engine", build_engine)
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = runner.invoke(main, ["build", str(tiny_dir), "--out", str(tmp_path / "engine")])
    finally:
        signal.signal(signal.SIGINT, found)
    assert cleaned == [True]
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "Error: interrupted" and "Traceback" not in result.output
