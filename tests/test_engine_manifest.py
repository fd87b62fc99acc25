"""builder/manifest.py: a manifest edited by hand and then re-sealed (so its digest fits) is still
checked field by field: every reader (generate --engine, repo, inspect) refuses it with one line
naming the field, never a KeyError, and no path in it may lead out of the engine dir."""

from __future__ import annotations

import json
import shutil

import pytest

from trimode.builder.manifest import seal
from trimode.stage_output import file_digest


def outside_program(root, d, m) -> str:
    """A real program copied next to the engine dir: what a path out of the engine dir would load."""
    shutil.copy(d / "programs" / "decode_1.pt2", root / "x.pt2")
    return file_digest(root / "x.pt2")


def relative_escape(root, d, m):
    m["files"]["../x.pt2"] = outside_program(root, d, m)
    m["backend"]["files"].append("../x.pt2")
    m["backend"]["programs"]["decode_1"] = "../x.pt2"


def absolute_path(root, d, m):
    path = str(root / "x.pt2")
    m["files"][path] = outside_program(root, d, m)
    m["backend"]["files"].append(path)
    m["backend"]["programs"]["decode_1"] = path


def symlink_out(root, d, m):
    digest = outside_program(root, d, m)
    (d / "programs" / "link.pt2").symlink_to(root / "x.pt2")
    m["files"]["programs/link.pt2"] = digest
    m["backend"]["files"].append("programs/link.pt2")
    m["backend"]["programs"]["decode_1"] = "programs/link.pt2"


def edit(*keys, value=None, delete: bool = False):
    """An edit of the field at m[keys[0]][keys[1]]...: set to value (value(old) if callable), or deleted."""

    def apply(root, d, m):
        *parents, last = keys
        for key in parents:
            m = m[key]
        if delete:
            del m[last]
        else:
            m[last] = value(m[last]) if callable(value) else value

    apply.__name__ = f"{'del ' if delete else ''}{'.'.join(map(str, keys))}"
    return apply


EDITS = [
    (edit("settings", "max_batch_size", delete=True), "settings.max_batch_size"),
    (edit("settings", "max_batch_size", value="4"), "settings.max_batch_size"),
    (edit("settings", "backend", value="vllm"), "settings.backend"),
    (edit("settings", "backend", value=["torch"]), "settings.backend"),
    (edit("settings", "block_lengths", value=[]), "settings.block_lengths"),
    (edit("settings", "max_input_len", value=500), "max-input-len"),  # above max_seq_len
    (edit("versions", delete=True), "versions"),
    (edit("device", value="cpu"), "device"),
    (edit("device", "type", value="tpu"), "device.type"),
    (edit("files", value=list), "files"),
    (edit("files", "checkpoint/config.json", value=7), "files"),
    (edit("programs", 0, "kind", value="beam"), "programs"),
    (edit("programs", value=lambda p: p[:2]), "programs"),
    (edit("backend", delete=True), "backend"),
    (edit("backend", "files", value=[{"a": 1}]), "backend.files"),
    (edit("backend", "programs", "decode_1", delete=True), "backend.programs"),
    (edit("backend", "programs", "decode_1", value="programs/none.pt2"), "backend.programs.decode_1"),
    (edit("backend", "programs", "decode_1", value="checkpoint/config.json"), "backend.programs.decode_1"),
    (edit("backend", "draft", value="draft_4"), "backend.draft"),
    (edit("backend", "batch1_programs", value={"denoise_4": "programs/none_b1.pt2"}), "backend.batch1_programs"),
    (
        edit("backend", "blocked_constants", value={"programs/denoise_4.pt2": {"c": ["gemms.x", 0]}}),
        "backend.blocked_constants",
    ),
    (edit("backend", "batch1_skipped", value=["denoise_4"]), "backend.batch1_skipped"),
    (edit("backend", "max_seq_len", value=None), "backend.max_seq_len"),
    (edit("backend", "max_input_len", value=8), "backend.max_input_len"),
    (edit("settings", "num_kv_blocks", value="8"), "settings.num_kv_blocks"),
    (edit("settings", "kv_block_size", value=0), "settings.kv_block_size"),
    (edit("kv_cache", delete=True), "kv_cache"),
    (edit("kv_cache", "num_blocks", value=3), "kv_cache.num_blocks"),
    (edit("kv_cache", "block_size", value=7), "kv_cache.block_size"),
    (edit("kv_cache", "bytes", value=-1), "kv_cache.bytes"),
    (edit("self_test", delete=True), "self_test"),
    (edit("self_test", "tokens", value={"beam": [[1]]}), "self_test.tokens"),
    (edit("self_test", "tokens", "ar", value=[[1, "x"]]), "self_test.tokens"),
    (edit("self_test", "tokens", "diffusion", delete=True), "self_test.tokens"),  # only quadratic may be missing
    (edit("self_test", "block_length", value=0), "self_test.block_length"),
    (edit("model", "config", value=None), "model.config"),
    (edit("auto", "seconds", value={"self-spec/3": {"1": 0.1}}), "auto.seconds"),  # not a built block length
    (edit("auto", "seconds", value={"beam": {"1": 0.1}}), "auto.seconds"),
    (edit("auto", "seconds", "ar", value={"one": 0.1}), "auto.seconds"),
    (edit("auto", "seconds", "ar", "1", value=-1), "auto.seconds"),
    (edit("auto", "seconds", "ar", "1", value=float("inf")), "auto.seconds"),
    (relative_escape, "outside the engine dir"),
    (absolute_path, "outside the engine dir"),
    (symlink_out, "outside the engine dir"),
]
COMMANDS = {
    "generate": lambda d, out: ["generate", "--engine", d, "hello", "--max-new-tokens", "2"],
    "repo": lambda d, out: ["repo", d, "--out", out],
    "inspect": lambda d, out: ["inspect", d],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("tamper, message", EDITS, ids=[t.__name__ for t, _ in EDITS])
def test_a_resealed_manifest_is_checked_field_by_field(tiny_engine_dir, tmp_path, refused, tamper, message, command):
    root = tmp_path / "root"
    d = root / "engine"
    shutil.copytree(tiny_engine_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    tamper(root, d, m)
    (d / "manifest.json").write_text(json.dumps(seal(m)))
    result = refused(COMMANDS[command](d, root / "repo"), root, message)
    assert "rebuild the engine" in result.error


def test_a_manifest_without_the_quadratic_self_test_is_well_formed_but_must_match_the_engine(tiny_engine_dir, tmp_path):
    """The modes that run the quadratic pass may be missing from the self-test (a build whose cycle of
    it does not fit max_seq_len leaves them out): the fields check passes; loading this engine, whose
    quadratic self-test does run, refuses it."""
    from trimode.builder.engine_dir import load_engine
    from trimode.builder.manifest import check_fields
    from trimode.errors import EngineError
    from trimode.passes import MODE_PASSES, Mode, PassKind

    d = tmp_path / "engine"
    shutil.copytree(tiny_engine_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    for mode in Mode:
        if PassKind.QUADRATIC in MODE_PASSES[mode]:
            del m["self_test"]["tokens"][mode.value]
    check_fields(d, m)
    (d / "manifest.json").write_text(json.dumps(seal(m)))
    with pytest.raises(EngineError, match="self-test gives other tokens than at build time"):
        load_engine(d)


def test_an_engine_without_auto_s_step_times_still_loads(tiny_engine_dir, tmp_path):
    """Without the manifest's `auto` (an --onnx-only build has none), auto measures every choice first."""
    from trimode.builder.engine_dir import load_engine

    d = tmp_path / "engine"
    shutil.copytree(tiny_engine_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    assert m["auto"]["seconds"]  # what a build writes now
    del m["auto"]
    (d / "manifest.json").write_text(json.dumps(seal(m)))
    assert load_engine(d).new_engine().auto.prior == {}
