"""The benchmark and the GPU check script run end to end (dry runs on CPU) and print JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> dict:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_gpu_check_dry_run_on_cpu():
    report = run_script("scripts/gpu_check.py", "--device", "cpu", "--small")
    assert report["fp8_tensor_cores"] is False
    assert all(row["max_rel_err_vs_simulation"] < 1e-5 for row in report["fp8_gemm"])
    assert report["invariant"]["self_spec_equals_ar_batch_8"] == "8/8"


def test_bench_modes_small_run(tmp_path):
    report = run_script("scripts/bench_modes.py", "--max-new-tokens", "4", "--batch-sizes", "1",
                        "--repeats", "1", "--json", str(tmp_path / "bench.json"))
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    assert report["ar_matches_transformers_b1_fraction"] == 1.0
    assert report["ar_vs_transformers_ratio"]["batch_1"] > 0
