"""`trimode deploy`: quantize -> build -> repo under one folder, each stage reused on a re-run
whose input and settings are unchanged, resumed after an interrupted run, served with --serve.
One deploy of the tiny checkpoint per module (a build is the slow part)."""

from __future__ import annotations

import json

import pytest

from trimode.cli import main
from trimode.errors import Interrupted

# small engine limits: the build compiles 5 programs, each takes longer the more it must cover
LIMITS = ["--calib-samples", "8", "--max-batch-size", "2", "--max-seq-len", "64", "--max-input-len", "16",
          "--block-lengths", "4"]
STAGES = ("quantize", "build", "repo")


def run_deploy(runner, tiny_dir, out, *extra):
    result = runner.invoke(main, ["deploy", str(tiny_dir), "--out", str(out), *LIMITS, *map(str, extra), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def reused(manifest) -> dict[str, bool]:
    return {stage: record["reused"] for stage, record in manifest["stages"].items()}


@pytest.fixture(scope="module")
def deployed(tiny_dir, tmp_path_factory):
    """A deploy interrupted during its build, then run again to the end (which must resume)."""
    from click.testing import CliRunner

    import trimode.builder

    out = tmp_path_factory.mktemp("deploy") / "d"
    runner, real_build = CliRunner(), trimode.builder.build_engine

    def interrupted_build(*args, **kwargs):
        raise Interrupted(15)

    trimode.builder.build_engine = interrupted_build
    try:
        first = runner.invoke(main, ["deploy", str(tiny_dir), "--out", str(out), *LIMITS])
    finally:
        trimode.builder.build_engine = real_build
    after_interrupt = {p.name for p in out.parent.iterdir()}, {p.name for p in out.iterdir()}
    second = run_deploy(runner, tiny_dir, out)
    return out, first, after_interrupt, second


def test_an_interrupted_deploy_keeps_its_finished_stages_and_resumes(deployed):
    out, first, (beside, inside), second = deployed
    assert first.exit_code == 143 and "Error: interrupted" in first.output
    assert beside == {"d"}, "no temporary sibling or lock left next to the output"
    assert inside == {"manifest.json", "quantized"}
    assert reused(second) == {"quantize": True, "build": False, "repo": False}


def test_each_stage_writes_its_own_output_and_manifest(deployed):
    out, _, _, manifest = deployed
    assert manifest["stage"] == "deploy" and manifest["folders"] == {"quantize": "quantized", "build": "engine",
                                                                     "repo": "repo"}
    stage_of = {folder: json.loads((out / folder / "manifest.json").read_text())
                for folder in manifest["folders"].values()}
    assert [m["stage"] for m in stage_of.values()] == ["quantize", "build", "repo"]
    assert stage_of["engine"]["quantization"] is not None, "the engine is built from the FP8 checkpoint"
    assert stage_of["repo"]["engine"]["path"] == str((out / "engine").resolve())
    assert json.loads((out / "manifest.json").read_text())["stages"] == manifest["stages"]
    # each stage's record chains to the previous stage's output
    assert manifest["stages"]["build"]["input_digest"] == manifest["stages"]["quantize"]["output_digest"]


def test_a_rerun_reuses_every_unchanged_stage_and_touches_nothing(deployed, runner, tiny_dir, tree):
    out = deployed[0]
    before = tree(out / "engine")
    again = run_deploy(runner, tiny_dir, out)
    assert reused(again) == dict.fromkeys(STAGES, True)
    assert tree(out / "engine") == before


def test_a_changed_setting_redoes_its_stage_and_what_follows_only(deployed, runner, tiny_dir):
    out = deployed[0]
    changed = run_deploy(runner, tiny_dir, out, "--prefix", "nld_")
    assert reused(changed) == {"quantize": True, "build": True, "repo": False}
    assert json.loads((out / "repo" / "manifest.json").read_text())["ensembles"]["ar"] == "nld_ar"
    back = run_deploy(runner, tiny_dir, out)
    assert reused(back) == {"quantize": True, "build": True, "repo": False}


def test_an_output_edited_since_is_redone(deployed, runner, tiny_dir):
    out = deployed[0]
    config = out / "repo" / "ar" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_size ", 1))
    again = run_deploy(runner, tiny_dir, out)
    assert reused(again) == {"quantize": True, "build": True, "repo": False}
    assert "max_batch_size " not in config.read_text()


def test_serve_answers_once_per_mode_from_the_real_server(deployed, runner, tiny_dir):
    from trimode.triton_repo.server import Ports

    out = deployed[0]
    ports = Ports.free()
    result = runner.invoke(main, ["deploy", str(tiny_dir), "--out", str(out), *LIMITS, "--serve", "--once",
                                  "--max-tokens", "12", "--http-port", ports.http, "--grpc-port", ports.grpc,
                                  "--metrics-port", ports.metrics, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert reused(report) == dict.fromkeys(STAGES, True)
    answers = {a["mode"]: a for a in report["answers"]}
    assert list(answers) == ["ar", "diffusion", "self-spec"]
    assert all(a["num_output_tokens"] > 0 and a["tokens_per_s"] > 0 and a["tokens_per_pass"] > 0
               for a in answers.values())
    assert answers["self-spec"]["text"] == answers["ar"]["text"]  # temperature 0: the invariant, served
    local = runner.invoke(main, ["generate", "--engine", str(out / "engine"), "--max-new-tokens", "12", "--json",
                                 "def __init__(self, name, value=None):"])
    assert local.exit_code == 0, local.output
    assert json.loads(local.stdout)["results"][0]["text"] == answers["ar"]["text"]
    assert (out / "tritonserver.log").is_file()


@pytest.mark.parametrize("args, message, code", [
    (["--backend", "tensorrt"], "tensorrt", 1),              # no TensorRT here: stops before quantizing
    (["--once"], "--once goes with --serve", 2),
    (["--serve", "--http-port", "9000", "--grpc-port", "9000"], "ports must differ", 2),
    (["--modes", "ar,beam"], "expected distinct modes", 2),
    (["--max-batch-size", "0"], "Invalid value for '--max-batch-size'", 2),
    (["--block-lengths", "100"], "--block-lengths", 1),     # above --max-seq-len 64
], ids=["tensorrt-absent", "once-alone", "same-ports", "unknown-mode", "batch-0", "block-above-seq-len"])
def test_bad_options_are_refused_before_anything_is_written(refused, tiny_dir, tmp_path, args, message, code):
    base = ["--calib-samples", "8", "--max-seq-len", "64", "--max-input-len", "16"]
    refused(["deploy", tiny_dir, "--out", tmp_path / "out", *base, *args], tmp_path, message, exit_code=code)


def test_bad_folders_are_refused_and_left_as_they_were(refused, tiny_dir, tmp_path, deployed):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused(["deploy", tiny_dir, "--out", tmp_path / "mine"], tmp_path, "not a trimode output")
    refused(["deploy", tiny_dir, "--out", deployed[0] / "engine"], deployed[0], "a build output")
    refused(["deploy", tmp_path / "missing", "--out", tmp_path / "out"], tmp_path, "not a directory")
    refused(["deploy", tiny_dir, "--out", tiny_dir / "deploy"], tiny_dir, "lies inside the input")
    (tmp_path / "not-nld").mkdir()
    (tmp_path / "not-nld" / "config.json").write_text('{"model_type": "llama"}')
    refused(["deploy", tmp_path / "not-nld", "--out", tmp_path / "out"], tmp_path, "not-nld")
