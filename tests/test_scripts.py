"""The benchmark and the GPU check script run end to end (dry runs on CPU) and print JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=None if env is None else {**os.environ, **env})
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


def test_bench_kernels_dry_run_on_cpu():
    """Every benchmark row checks the kernel against its reference before timing it."""
    report = run_script("scripts/bench_kernels.py", "--device", "cpu", "--small", env={"TRITON_INTERPRET": "1"})
    ops = [row["op"] for row in report["rows"]]
    assert ops.count("block_attention") == 4 and "spec_accept" in ops and "diffusion_commit" in ops
    for row in report["rows"]:
        best = min(v for k, v in row.items() if k.endswith("_us") and k != "kernel_us")
        assert row["kernel_us"] > 0 and abs(row["speedup"] - best / row["kernel_us"]) < 2e-3
        assert row.get("max_abs_err", 0.0) < 1e-4 and row.get("exact", True) is True
