"""`trimode deploy`: quantize -> build -> repo under one folder, each stage reused on a re-run
whose input and settings are unchanged, an interrupted run resumed, served with --serve.
The deploy itself is conftest's shared `tiny_deploy_dir` (the FP8 engine tests use its engine);
the tests here work on copies of it, so none of them pays for another build."""

from __future__ import annotations

import json
import shutil

import pytest

from trimode.cli import main
from trimode.errors import Interrupted

from conftest import DEPLOY_ARGS

STAGES = ("quantize", "build", "repo")


def run_deploy(runner, ck, out, *extra):
    result = runner.invoke(main, ["deploy", str(ck), "--out", str(out), *DEPLOY_ARGS, *map(str, extra), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def reused(manifest) -> dict[str, bool]:
    return {stage: record["reused"] for stage, record in manifest["stages"].items()}


@pytest.fixture
def copied(tiny_deploy_dir, tmp_path):
    """A copy of the shared deploy: a moved deploy folder, whose repository names the old engine path."""
    return shutil.copytree(tiny_deploy_dir, tmp_path / "moved", symlinks=True)


def test_each_stage_writes_its_own_output_and_manifest(tiny_deploy_dir):
    manifest = json.loads((tiny_deploy_dir / "manifest.json").read_text())
    assert manifest["stage"] == "deploy" and manifest["folders"] == {
        "quantize": "quantized",
        "build": "engine",
        "repo": "repo",
    }
    assert reused(manifest) == dict.fromkeys(STAGES, False)
    stage_of = {
        folder: json.loads((tiny_deploy_dir / folder / "manifest.json").read_text())
        for folder in manifest["folders"].values()
    }
    assert [m["stage"] for m in stage_of.values()] == ["quantize", "build", "repo"]
    assert stage_of["engine"]["quantization"] is not None, "the engine is built from the FP8 checkpoint"
    assert stage_of["engine"]["model"]["has_draft_adapter"]
    assert stage_of["repo"]["engine"]["path"] == str((tiny_deploy_dir / "engine").resolve())
    # each stage's record chains to the previous stage's output
    assert manifest["stages"]["build"]["input_digest"] == manifest["stages"]["quantize"]["output_digest"]
    assert manifest["stages"]["repo"]["input_digest"] == manifest["stages"]["build"]["output_digest"]


def test_a_rerun_reuses_every_unchanged_stage_and_touches_nothing(copied, runner, tiny_adapter_dir, tree):
    moved = run_deploy(runner, tiny_adapter_dir, copied)  # only the repository names a path
    assert reused(moved) == {"quantize": True, "build": True, "repo": False}
    assert json.loads((copied / "repo" / "manifest.json").read_text())["engine"]["path"] == str(copied / "engine")
    before = tree(copied)
    again = run_deploy(runner, tiny_adapter_dir, copied)
    assert reused(again) == dict.fromkeys(STAGES, True)
    assert {k: v for k, v in tree(copied).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    # step times saved with the engine (`trimode bench --save-step-times`) are no new input of the repository
    engine_digest = json.loads((copied / "engine" / "manifest.json").read_text())["digest_sha256"]
    saved = {"engine_digest": engine_digest, "seconds": {"ar": {"1": 0.001}}}
    (copied / "engine" / "step_times.json").write_text(json.dumps(saved))
    assert reused(run_deploy(runner, tiny_adapter_dir, copied)) == dict.fromkeys(STAGES, True)


def test_a_changed_setting_or_an_edited_output_redoes_that_stage_only(copied, runner, tiny_adapter_dir):
    changed = run_deploy(runner, tiny_adapter_dir, copied, "--prefix", "nld_")
    assert reused(changed) == {"quantize": True, "build": True, "repo": False}
    assert json.loads((copied / "repo" / "manifest.json").read_text())["ensembles"]["ar"] == "nld_ar"
    config = copied / "repo" / "nld_ar" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_size ", 1))
    again = run_deploy(runner, tiny_adapter_dir, copied, "--prefix", "nld_")
    assert reused(again) == {"quantize": True, "build": True, "repo": False}
    assert "max_batch_size " not in config.read_text()


def test_an_interrupted_stage_keeps_the_previous_output_and_the_rerun_resumes(
    copied, runner, tiny_adapter_dir, tree, monkeypatch
):
    import trimode.triton_repo.writer as writer

    run_deploy(runner, tiny_adapter_dir, copied)
    before = tree(copied)
    real = writer.write_model_repo

    def interrupted(engine_dir, out_dir, settings, force):  # SIGTERM halfway through the repo stage
        with writer.stage_output(out_dir, writer.STAGE, [engine_dir], force) as tmp:
            (tmp / "half-written").write_text("")
            raise Interrupted(15)

    monkeypatch.setattr(writer, "write_model_repo", interrupted)
    result = runner.invoke(
        main, ["deploy", str(tiny_adapter_dir), "--out", str(copied), *DEPLOY_ARGS, "--prefix", "nld_"]
    )
    assert result.exit_code == 143 and "Error: interrupted" in result.output
    after = tree(copied)
    assert json.loads(after.pop("manifest.json"))["stages"] == json.loads(before.pop("manifest.json"))["stages"]
    assert after == before, "the previous repository is as it was"
    assert [p.name for p in copied.parent.iterdir()] == ["moved"], "no temporary sibling or lock left"
    monkeypatch.setattr(writer, "write_model_repo", real)
    assert reused(run_deploy(runner, tiny_adapter_dir, copied, "--prefix", "nld_")) == {
        "quantize": True,
        "build": True,
        "repo": False,
    }


def test_a_first_deploy_interrupted_keeps_its_finished_stages(runner, tiny_adapter_dir, tmp_path, monkeypatch):
    import trimode.builder

    def interrupted(*args, **kwargs):
        raise Interrupted(15)

    monkeypatch.setattr(trimode.builder, "build_engine", interrupted)
    out = tmp_path / "d"
    result = runner.invoke(main, ["deploy", str(tiny_adapter_dir), "--out", str(out), *DEPLOY_ARGS])
    assert result.exit_code == 143 and "Error: interrupted" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "quantized"]
    record = json.loads((out / "manifest.json").read_text())["stages"]
    assert list(record) == ["quantize"], "the next run reuses the finished quantize stage"


def test_a_first_deploy_killed_in_its_first_stage_resumes(runner, tiny_dir, tmp_path):
    """SIGKILL while the first stage (here the build) writes leaves that stage's temporary folder and
    lock; the next run must clear them and finish, not refuse the folder as "not a trimode output"."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "d"
    args = [
        "deploy",
        str(tiny_dir),
        "--out",
        str(out),
        "--no-fp8",
        "--max-batch-size",
        "2",
        "--max-seq-len",
        "64",
        "--max-input-len",
        "16",
        "--block-lengths",
        "4",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimode.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (out.is_dir() and any(p.name.startswith(".engine.build-") for p in out.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "the build stage never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(p.name == ".engine.lock" for p in out.iterdir())
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert reused(json.loads(result.stdout)) == {"build": False, "repo": False}
    assert sorted(p.name for p in out.iterdir()) == ["engine", "manifest.json", "repo"]


def test_serve_answers_once_per_mode_from_the_real_server(copied, runner, tiny_adapter_dir):
    from trimode.triton_repo.server import Ports

    out = copied
    ports = Ports.free()
    result = runner.invoke(
        main,
        [
            "deploy",
            str(tiny_adapter_dir),
            "--out",
            str(out),
            *DEPLOY_ARGS,
            "--serve",
            "--once",
            "--max-tokens",
            "12",
            "--http-port",
            ports.http,
            "--grpc-port",
            ports.grpc,
            "--metrics-port",
            ports.metrics,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert reused(report) == {"quantize": True, "build": True, "repo": False}
    answers = {a["mode"]: a for a in report["answers"]}
    assert list(answers) == ["ar", "diffusion", "self-spec", "quadratic", "auto"]
    assert all(
        a["num_output_tokens"] > 0 and a["tokens_per_s"] > 0 and a["tokens_per_pass"] > 0 for a in answers.values()
    )
    for mode in ("self-spec", "quadratic", "auto"):  # temperature 0: the invariant, served
        assert answers[mode]["text"] == answers["ar"]["text"]
    local = runner.invoke(
        main,
        [
            "generate",
            "--engine",
            str(out / "engine"),
            "--max-new-tokens",
            "12",
            "--json",
            "def __init__(self, name, value=None):",
        ],
    )
    assert local.exit_code == 0, local.output
    assert json.loads(local.stdout)["results"][0]["text"] == answers["ar"]["text"]
    assert (out / "tritonserver.log").is_file()


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--backend", "tensorrt"], "tensorrt", 1),  # no TensorRT here: stops before quantizing
        (["--once"], "--once goes with --serve", 2),
        (["--serve", "--http-port", "9000", "--grpc-port", "9000"], "ports must differ", 2),
        (["--modes", "ar,beam"], "expected distinct modes", 2),
        (["--max-batch-size", "0"], "Invalid value for '--max-batch-size'", 2),
        (["--block-lengths", "100"], "--block-lengths", 1),  # above --max-seq-len 64
    ],
    ids=["tensorrt-absent", "once-alone", "same-ports", "unknown-mode", "batch-0", "block-above-seq-len"],
)
def test_bad_options_are_refused_before_anything_is_written(refused, tiny_dir, tmp_path, args, message, code):
    base = ["--calib-samples", "8", "--max-seq-len", "64", "--max-input-len", "16"]
    refused(["deploy", tiny_dir, "--out", tmp_path / "out", *base, *args], tmp_path, message, exit_code=code)


def test_bad_folders_are_refused_and_left_as_they_were(refused, tiny_dir, tmp_path, tiny_deploy_dir):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused(["deploy", tiny_dir, "--out", tmp_path / "mine"], tmp_path, "not a trimode output")
    refused(["deploy", tiny_dir, "--out", tiny_deploy_dir / "engine"], tiny_deploy_dir, "a build output")
    refused(["deploy", tmp_path / "missing", "--out", tmp_path / "out"], tmp_path, "not a directory")
    refused(["deploy", tiny_dir, "--out", tiny_dir / "deploy"], tiny_dir, "lies inside the input")
    (tmp_path / "not-nld").mkdir()
    (tmp_path / "not-nld" / "config.json").write_text('{"model_type": "llama"}')
    refused(["deploy", tmp_path / "not-nld", "--out", tmp_path / "out"], tmp_path, "not-nld")
