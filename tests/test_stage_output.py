"""stage_output: what a stage writes, what --force replaces, and that nothing is left on failure."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from trimode.errors import Interrupted, OutputError
from trimode.stage_output import check_output, stage_output, write_manifest

from conftest import file_tree as tree


def write_stage(out: Path, stage: str = "demo", force: bool = False, inputs=(), files=None) -> Path:
    with stage_output(out, stage, inputs, force) as tmp:
        for name, text in (files or {"a.txt": "A"}).items():
            (tmp / name).write_text(text)
        write_manifest(tmp, {"stage": stage})
    return out


def test_writes_exactly_the_output(tmp_path):
    out = write_stage(tmp_path / "out", files={"a.txt": "A", "b.txt": "B"})
    assert sorted(tree(tmp_path)) == ["out", "out/a.txt", "out/b.txt", "out/manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["stage"] == "demo"


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path):
    write_stage(tmp_path / "a" / "b" / "out")
    assert (tmp_path / "a" / "b" / "out" / "a.txt").is_file()
    with pytest.raises(RuntimeError):
        with stage_output(tmp_path / "x" / "y" / "out", "demo"):
            raise RuntimeError("boom")
    assert sorted(tree(tmp_path)) == ["a", "a/b", "a/b/out", "a/b/out/a.txt", "a/b/out/manifest.json"]


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), OSError(28, "No space left")])
def test_failure_leaves_nothing_and_keeps_the_previous_output(tmp_path, failure):
    out = write_stage(tmp_path / "out", files={"old.txt": "old"})
    before = tree(tmp_path)
    with pytest.raises((type(failure), OutputError)):
        with stage_output(out, "demo", force=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise failure
    assert tree(tmp_path) == before


def test_sigterm_raises_interrupted_and_cleans_up(tmp_path):
    with pytest.raises(Interrupted) as info:
        with stage_output(tmp_path / "out", "demo") as tmp:
            (tmp / "x").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.signum == signal.SIGTERM
    assert tree(tmp_path) == {}
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again


def test_force_replaces_only_a_previous_output_of_the_same_stage(tmp_path):
    out = write_stage(tmp_path / "out", files={"old.txt": "old"})
    with pytest.raises(OutputError, match="--force replaces a previous demo output"):
        write_stage(out)
    write_stage(out, force=True, files={"new.txt": "new"})
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "new.txt"]
    with pytest.raises(OutputError, match="a demo output; --force only replaces a previous other output"):
        write_stage(out, stage="other", force=True)
    assert (out / "new.txt").read_text() == "new"


@pytest.mark.parametrize("manifest", [None, "{not json", '["stage"]', '{"stage": 3}', '{"tool": "x"}'])
def test_force_never_replaces_a_folder_that_is_not_a_stage_output(tmp_path, manifest):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    if manifest is not None:
        (mine / "manifest.json").write_text(manifest)
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="not a trimode output.*remove it yourself"):
        write_stage(mine, force=True)
    assert tree(tmp_path) == before


def test_an_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    write_stage(tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").is_file()


def test_a_path_it_did_not_create_is_never_touched(tmp_path):
    """quantize used to delete a pre-existing OUT.tmp; siblings of any name stay as they are."""
    for name in ("out.tmp", ".out.tmp", ".out.demo-0000", ".out.lock.bak"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep").write_text(name)
    before = tree(tmp_path)
    write_stage(tmp_path / "out")
    after = tree(tmp_path)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["out", "out/a.txt", "out/manifest.json"]


@pytest.mark.parametrize("given", ["", ".", "/", "./"])
def test_refuses_empty_dot_and_root(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious").write_text("x")
    with pytest.raises(OutputError, match="--out"):
        write_stage(Path(given) if given else given, force=True)
    assert tree(tmp_path) == {"precious": b"x"}


def test_refuses_the_current_directory_by_any_name(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for given in (tmp_path / "sub", "../sub", str(tmp_path / "sub") + "/"):
        with pytest.raises(OutputError, match="refusing"):
            check_output(given, "demo", force=True)


@pytest.mark.parametrize(
    "where, relation",
    [
        ("ck", "is the input"),
        ("ck/sub", "lies inside the input"),
        (".", "contains the input"),
        ("ck/../ck", "is the input"),
        ("link", "is the input"),
    ],
)
def test_refuses_outputs_overlapping_an_input(tmp_path, where, relation):
    ck = tmp_path / "parent" / "ck"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text("{}")
    (tmp_path / "parent" / "link").symlink_to(ck)
    before = tree(tmp_path)
    with pytest.raises(OutputError, match=relation):
        write_stage(tmp_path / "parent" / where, force=True, inputs=[ck])
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "setup, out, message",
    [
        ("file", "f", "exists and is not a directory"),
        ("file", "f/out", "its parent is a file"),
        ("file", "f/a/b/out", "lies under the file"),
    ],
)
def test_refuses_files_in_the_way(tmp_path, setup, out, message):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputError, match=message):
        write_stage(tmp_path / out)
    assert tree(tmp_path) == {"f": b"a file"}


def test_refuses_a_parent_it_cannot_write_before_any_work():
    ran = []
    with pytest.raises(OutputError, match="cannot (write|create)"):
        with stage_output(Path("/sys/trimode-test-out"), "demo"):
            ran.append(True)
    assert not ran and not Path("/sys/trimode-test-out").exists()


def test_two_writers_of_one_output_cannot_both_succeed(tmp_path):
    out = tmp_path / "out"
    with stage_output(out, "demo") as tmp:
        with pytest.raises(OutputError, match="another run is writing this output"):
            write_stage(out, force=True)
        (tmp / "a.txt").write_text("first")
        write_manifest(tmp, {"stage": "demo"})
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(OutputError, match="exists and is not empty"):
        write_stage(out)  # the second run, later: still refused without --force
    assert sorted(tree(tmp_path)) == ["out", "out/a.txt", "out/manifest.json"]


def test_a_killed_run_is_cleaned_up_by_the_next(tmp_path):
    """What a SIGKILL leaves: the lock file naming the temp sibling (and an output moved aside)."""
    out = write_stage(tmp_path / "out", files={"old.txt": "old"})
    tmp, moved = tmp_path / ".out.demo-dead", tmp_path / ".out.replaced-dead"
    tmp.mkdir()
    (tmp / "half").write_text("x")
    out.rename(moved)  # killed between moving the old output aside and renaming the new one in
    (tmp_path / ".out.lock").write_text(json.dumps({"tmp": str(tmp), "replaced": str(moved)}))
    with pytest.raises(OutputError, match="exists and is not empty"):
        write_stage(out)  # the previous output was put back first, so this is refused
    assert (out / "old.txt").read_text() == "old" and not tmp.exists() and not moved.exists()
    write_stage(out, force=True, files={"new.txt": "new"})
    assert sorted(tree(tmp_path)) == ["out", "out/manifest.json", "out/new.txt"]


def test_the_recovery_touches_only_recorded_siblings_of_this_output(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / ".out.lock").write_text(json.dumps({"tmp": str(elsewhere), "replaced": str(tmp_path / "other")}))
    write_stage(tmp_path / "out")
    assert elsewhere.is_dir() and (tmp_path / "other").is_dir()


def test_a_stage_without_its_manifest_is_a_bug_and_leaves_nothing(tmp_path):
    with pytest.raises(AssertionError, match="manifest"):
        with stage_output(tmp_path / "out", "demo") as tmp:
            (tmp / "a.txt").write_text("A")
    assert tree(tmp_path) == {}
