"""The benchmark and the GPU check script run end to end (dry runs on CPU) and print JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from trimode.passes import Mode

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_gpu_check_dry_run_on_cpu():
    report = run_script("scripts/gpu_check.py", "--device", "cpu", "--small")
    assert report["fp8_tensor_cores"] is False
    assert all(row["max_rel_err_vs_simulation"] < 1e-5 for row in report["fp8_gemm"])
    assert report["invariant"]["self_spec_equals_ar_batch_8"] == "8/8"
    assert report["async_steps"] == {
        "syncs_per_step": None,
        "sync_messages": [],
        "tokens_equal_sync": True,
        "auto_tokens_equal_ar": True,
    }


def test_bench_modes_small_run(tmp_path):
    report = run_script(
        "scripts/bench_modes.py",
        "--max-new-tokens",
        "4",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--against-no-adapter",
        "--json",
        str(tmp_path / "bench.json"),
    )
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    assert report["ar_matches_transformers_b1_fraction"] == 1.0
    assert report["ar_vs_transformers_ratio"]["batch_1"] > 0
    row = report["results"]["batch_1"]  # self-spec with and without the draft adapter, both == AR
    assert row["self_spec_matches_ar"] == row["self_spec_no_adapter_matches_ar"] == [True]
    assert row["self-spec/no-adapter"]["seq_passes_by_kind"]["draft"] >= 1
    assert row["self_spec_vs_ar_ratio"] > 0 and row["self_spec_no_adapter_vs_ar_ratio"] > 0


def test_bench_kernels_dry_run_on_cpu():
    """Every benchmark row checks the kernel against its reference before timing it."""
    report = run_script("scripts/bench_kernels.py", "--device", "cpu", "--small", env={"TRITON_INTERPRET": "1"})
    ops = [row["op"] for row in report["rows"]]
    assert ops.count("block_attention") == 4 and "spec_accept" in ops and "diffusion_commit" in ops
    for row in report["rows"]:
        best = min(v for k, v in row.items() if k.endswith("_us") and k != "kernel_us")
        assert row["kernel_us"] > 0 and abs(row["speedup"] - best / row["kernel_us"]) < 2e-3
        assert row.get("max_abs_err", 0.0) < 1e-4 and row.get("exact", True) is True


def test_bench_engine_on_an_fp8_engine(tiny_engine_dir, tmp_path):
    """The engine benchmark on the shared FP8 engine: no transformers column (it cannot load ModelOpt
    FP8), the engine's tokens equal the eager runtime's, and self-spec's equal AR's."""
    report = run_script(
        "scripts/bench_engine.py",
        "--engine",
        str(tiny_engine_dir),
        "--batch-sizes",
        "1,2",
        "--max-new-tokens",
        "6",
        "--repeats",
        "1",
        "--pass-repeats",
        "2",
        "--threads",
        "1",
        "--json",
        str(tmp_path / "engine.json"),
    )
    assert json.loads((tmp_path / "engine.json").read_text()) == report
    for row in report["results"].values():
        assert "transformers" not in row and row["self_spec_equals_ar"] is True
        assert all(row["engine_equals_eager"].values()) and all(r > 0 for r in row["engine_vs_eager"].values())
        assert row["passes"]["engine_block_pass_vs_decode"] > 0


def test_bench_serving_small_run(tiny_engine_dir, tmp_path):
    """Served tokens/s vs in-process through a real tritonserver, and through the OpenAI front end
    over it: every row's text agrees."""
    report = run_script(
        "scripts/bench_serving.py",
        "--engine",
        str(tiny_engine_dir),
        "--concurrency",
        "1,2",
        "--max-new-tokens",
        "6",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--json",
        str(tmp_path / "serving.json"),
    )
    assert json.loads((tmp_path / "serving.json").read_text()) == report
    assert set(report["results"]) == {"concurrency_1", "concurrency_2"}
    for row in report["results"].values():
        assert all(row["served_text_equals_in_process"].values())
        assert set(row["served_vs_in_process"]) == {m.value for m in Mode}
        assert all(r > 0 for r in row["served_vs_in_process"].values())
        assert row["ar/served"]["tokens_generated"] == row["ar/in_process"]["tokens_generated"] > 0
        assert row["ar/openai"]["tokens_generated"] == row["ar/served"]["tokens_generated"]  # the front end's path
        assert set(row["openai_vs_served"]) == {m.value for m in Mode}


def test_draft_modules_small_run(tiny_adapter_dir, tmp_path):
    """The issue-11 experiment end to end on a tiny checkpoint: o_proj's adapter continued plus new
    LoRAs on two other linears, the runtime-path estimate before and after (a few steps)."""
    from trimode.training.corpus import read_texts, split_files

    data = tmp_path / "text.py"
    data.write_text("\n".join(read_texts(split_files()[0][:3])))
    report = run_script(
        "scripts/draft_modules.py",
        str(tiny_adapter_dir),
        "--modules",
        "q_proj,down_proj",
        "--rank",
        "4",
        "--steps",
        "3",
        "--num-prompts",
        "2",
        "--block-length",
        "4",
        "--data",
        str(data),
        "--json",
        str(tmp_path / "r.json"),
        "--adapter",
        str(tmp_path / "ck" / "linear_spec_lora"),
    )
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["modules"] == ["o_proj", "q_proj", "down_proj"] and report["steps"] == 3
    shutil.copytree(
        tiny_adapter_dir, tmp_path / "ck", ignore=shutil.ignore_patterns("linear_spec_lora"), dirs_exist_ok=True
    )  # the base next to the written adapter: it loads
    from trimode.checkpoint import load_checkpoint
    from trimode.model import draft_twins

    assert {name for _, name in draft_twins(load_checkpoint(tmp_path / "ck").model)} == {
        "o_proj",
        "q_proj",
        "down_proj",
    }
    assert 1 <= report["before"] <= 4 and 1 <= report["after"] <= 4
    refused = subprocess.run(
        [sys.executable, "scripts/draft_modules.py", "--modules", "lm_head"], cwd=ROOT, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "unknown ['lm_head']" in refused.stderr


def test_bench_host_on_an_fp8_engine(tiny_engine_dir, tmp_path):
    """The host-work benchmark: a row per (mode, batch size), each step split into pass and host time."""
    report = run_script(
        "scripts/bench_host.py",
        *("--engine", str(tiny_engine_dir), "--batch-sizes", "1,2", "--requests", "1", "--max-tokens", "5"),
        *("--repeats", "1", "--json", str(tmp_path / "host.json")),
    )
    assert json.loads((tmp_path / "host.json").read_text()) == report
    assert [(r["mode"], r["batch"]) for r in report["results"]] == [
        (m, b) for m in ("ar", "self-spec", "diffusion") for b in (1, 2)
    ]
    for r in report["results"]:
        assert r["steps"] >= 2 and 0 < r["in_pass"] < 1 and r["host_us"] > 0  # a prefill step and a cycle at least
        assert abs(r["us_per_step"] * (1 - r["in_pass"]) - r["host_us"]) <= 0.01 * r["us_per_step"] + 0.2
    refused = subprocess.run(
        [sys.executable, "scripts/bench_host.py", "--engine", str(tiny_engine_dir), "--batch-sizes", "1,999"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "--batch-sizes: this engine has" in refused.stderr


def test_bench_kv_small_run(tmp_path):
    """The paged pool admits more requests than dense slots of the same memory, the prefix cache
    saves prefill tokens, and the tokens are those of the dense, uncached runs."""
    report = run_script(
        "scripts/bench_kv.py",
        *("--max-seq-len", "128", "--max-len", "48", "--requests", "8", "--budget-seqs", "2"),
        *("--prefix-len", "48", "--prefix-requests", "3", "--threads", "1", "--json", str(tmp_path / "kv.json")),
    )
    assert json.loads((tmp_path / "kv.json").read_text()) == report
    assert report["tokens_equal"] is True
    assert report["admitted_dense"] == 2 and report["admitted_paged"] > 2
    assert report["admission"]["dense"]["kv_bytes"] == report["admission"]["paged"]["kv_bytes"]
    assert report["prefix"]["prefill_computed_cached"] < report["prefix"]["prefill_computed_uncached"]
    assert 0.5 < report["prefix_prefill_tokens_saved"] < 1
