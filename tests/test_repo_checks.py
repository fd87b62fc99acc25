"""`trimode repo` checks its engine dir as every reader of one does (the manifest, its seal, every
file's digest, the versions and the device) before it writes anything, and refuses a
--max-batch-size above the engine's slots: a broken engine dir fails here, not when
`trimode serve` starts tritonserver."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture
def root(tiny_engine_dir, tmp_path):
    """A folder holding a copy of the tiny engine dir (root/engine); the repository goes to root/repo."""
    shutil.copytree(tiny_engine_dir, tmp_path / "root" / "engine")
    return tmp_path / "root"


def truncate_program(d):
    path = d / "programs" / "decode_1.pt2"
    path.write_bytes(path.read_bytes()[:1000])


def edit_manifest(d):
    m = json.loads((d / "manifest.json").read_text())
    m["settings"]["max_batch_size"] = 64  # not re-sealed
    (d / "manifest.json").write_text(json.dumps(m))


def remove_file(d):
    (d / "checkpoint" / "tokenizer.json").unlink()


def add_file(d):
    (d / "programs" / "decode_2.pt2").write_bytes(b"not ours")


def edit_checkpoint(d):
    path = d / "checkpoint" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one weight byte, header and size unchanged
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (truncate_program, "programs/decode_1.pt2 changed after the build"),
        (edit_manifest, "manifest.json was edited after the build"),
        (remove_file, "checkpoint/tokenizer.json is missing"),
        (add_file, "programs/decode_2.pt2 was not part of the build"),
        (edit_checkpoint, "checkpoint/model.safetensors changed after the build"),
    ],
)
def test_repo_refuses_a_broken_engine_dir_before_writing(root, refused, tamper, message):
    tamper(root / "engine")
    refused(["repo", root / "engine", "--out", root / "repo"], root, message)


def test_repo_refuses_a_batch_above_the_engines_slots(root, refused, runner):
    from trimode.cli import main

    result = refused(
        ["repo", root / "engine", "--out", root / "repo", "--max-batch-size", "5"], root, "--max-batch-size 5"
    )
    assert "the engine's 4 slots" in result.error and "give at most 4" in result.error  # the shared deploy's
    ok = runner.invoke(main, ["repo", str(root / "engine"), "--out", str(root / "repo"), "--max-batch-size", "4"])
    assert ok.exit_code == 0, ok.output
