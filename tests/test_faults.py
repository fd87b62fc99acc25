"""Faults: SIGKILL and SIGINT at random points of quantize and make-checkpoint never leave a partial
output at the output path, a re-run succeeds, and of two concurrent runs to one output exactly one
succeeds. Runs are real processes running the CLI: forked from tests/forkserver.py, which pays the
ModelOpt import once, and (for the exit statuses) `python -m trimode.cli` itself."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trimode.safetensors_mmap import read_header

from conftest import file_tree

TESTS = Path(__file__).resolve().parent
NUM_RUNS = 20


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "forkserver.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=TESTS.parent,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert json.loads(proc.stdout.readline())["ready"]

    def run(runs: list[list], log: Path, sig: str | None = None, delay: float = 0.0) -> dict:
        job = {"runs": [[str(a) for a in args] for args in runs], "signal": sig, "delay": delay, "log": str(log)}
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture
def setup(tiny_dir, tmp_path):
    """-> (the command line for a stage, its output folder, the input folder to keep unchanged)."""
    inputs = tmp_path / "in"
    shutil.copytree(tiny_dir, inputs / "ck")
    (inputs / "calib.txt").write_text("def f(x):\n    return x * 2  # calibration text\n" * 40)
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"

    def command(stage: str, force: bool = True) -> list:
        extra = ["--force"] if force else []
        if stage == "quantize":
            return [
                "quantize",
                inputs / "ck",
                "--out",
                out,
                "--calib-data",
                inputs / "calib.txt",
                "--calib-samples",
                4,
                "--calib-seq-len",
                32,
                *extra,
            ]
        return [
            "make-checkpoint",
            "--random",
            "--out",
            out,
            "--draft-adapter",
            "--shards",
            2,
            "--hidden-size",
            256,
            "--num-layers",
            4,
            "--vocab-size",
            1024,
            *extra,
        ]

    return command, out, inputs


def files_of(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def check_state(out: Path, stage: str, reference: list[str], may_leave_debris: bool) -> bool:
    """The output path holds nothing or the whole output; -> whether it holds one."""
    entries = sorted(os.listdir(out.parent))
    assert [e for e in entries if not e.startswith(".")] in ([], [out.name])
    hidden = [e for e in entries if e.startswith(".")]
    if may_leave_debris:  # SIGKILL: the lock file and the temporary sibling, both hidden, for the next run
        assert all(e.startswith(f".{out.name}.") for e in hidden), hidden
    else:
        assert hidden == []
    if not out.exists():
        return False
    assert files_of(out) == reference
    assert json.loads((out / "manifest.json").read_text())["stage"] == stage
    for path in out.rglob("*.safetensors"):
        read_header(path)  # every byte the header promises is there
    return True


@pytest.mark.parametrize("sig", ["KILL", "INT"])
@pytest.mark.parametrize("stage", ["quantize", "make-checkpoint"])
def test_signal_at_random_points_leaves_no_partial_output(server, setup, tmp_path, stage, sig):
    command, out, inputs = setup
    before = file_tree(inputs)
    clean = [server([command(stage)], tmp_path / "log") for _ in range(2)]  # the second one warm
    assert [c["rcs"] for c in clean] == [[0], [0]], (tmp_path / "log").read_text()
    reference, seconds = files_of(out), min(c["seconds"] for c in clean)
    rng = random.Random(f"{stage}-{sig}")
    statuses = []
    for _ in range(NUM_RUNS):
        if rng.random() < 0.5:
            shutil.rmtree(out, ignore_errors=True)  # half the runs write a new output, half replace one
        result = server([command(stage)], tmp_path / "log", sig=sig, delay=rng.uniform(0.0, 1.1 * seconds))
        (status,) = result["rcs"]
        assert status in ((0, -signal.SIGKILL) if sig == "KILL" else (0, 130)), (tmp_path / "log").read_text()
        holds_output = check_state(out, stage, reference, may_leave_debris=sig == "KILL")
        assert holds_output or status != 0
        statuses.append(status)
    assert sum(s != 0 for s in statuses) >= NUM_RUNS // 3  # the signals landed while the stage ran
    rerun = server([command(stage)], tmp_path / "log")
    assert rerun["rcs"] == [0]
    assert check_state(out, stage, reference, may_leave_debris=False)  # a killed run's debris is gone too
    assert file_tree(inputs) == before


@pytest.mark.parametrize("stage", ["quantize", "make-checkpoint"])
def test_two_concurrent_runs_to_one_output_exactly_one_succeeds(server, setup, tmp_path, stage):
    command, out, inputs = setup
    first = server([command(stage)], tmp_path / "log")  # for the reference file list
    reference = files_of(out)
    for attempt in range(3):
        shutil.rmtree(out)
        result = server([command(stage, force=False)] * 2, tmp_path / "log")
        assert sorted(result["rcs"]) == [0, 1], (tmp_path / "log").read_text()
        assert check_state(out, stage, reference, may_leave_debris=False)
    assert first["rcs"] == [0]
    log = (tmp_path / "log").read_text()
    assert "Error: --out" in log and ("another run is writing" in log or "exists and is not empty" in log)


def test_the_entry_point_exits_130_on_ctrl_c_and_143_on_sigterm(tmp_path):
    """`python -m trimode.cli`, signalled while it writes (its temporary sibling exists)."""
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        parent = tmp_path / sig.name
        parent.mkdir()
        args = [
            sys.executable,
            "-m",
            "trimode.cli",
            "make-checkpoint",
            "--random",
            "--out",
            parent / "out",
            "--hidden-size",
            512,
            "--num-layers",
            8,
            "--vocab-size",
            4096,
        ]
        procs[sig] = (
            subprocess.Popen(
                [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS.parent
            ),
            parent,
        )
    deadline = time.monotonic() + 120
    pending = dict(procs)
    while pending and time.monotonic() < deadline:
        for sig, (proc, parent) in list(pending.items()):
            if any(e.startswith(".out.make-checkpoint-") for e in os.listdir(parent)):
                proc.send_signal(sig)
                del pending[sig]
        time.sleep(0.002)
    assert not pending, "the stage never started writing"
    for sig, (proc, parent) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, stderr
        assert stderr.strip().splitlines()[-1] == "Error: interrupted" and "Traceback" not in stderr
        assert stdout == "" and os.listdir(parent) == []
