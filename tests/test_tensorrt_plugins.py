"""The TensorRT AOT plugins up to the TensorRT call: each kernel compiles to PTX for Hopper (no GPU
needed), with the parameter layout TensorRT launches (inputs, int extra args, outputs), and the
extra args the plugin derives from shapes equal what the torch launcher passes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from trimode.plugins import tensorrt as trt_plugins


def compile_in_subprocess(call: str) -> dict:
    """Compile for real: this process runs kernels under TRITON_INTERPRET, which cannot compile."""
    code = (
        "import json, torch; from trimode.plugins import tensorrt as t; "
        f"k = {call}; print(json.dumps(dict(name=k.name, ptx=k.ptx, num_threads=k.num_threads)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def capture_launch(monkeypatch, module, kernel_name: str) -> dict:
    """Replace a kernel by a recorder of the grid and arguments its torch launcher passes."""
    seen = {}

    class Capture:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                seen["grid"], seen["args"], seen["constexprs"] = grid, args, constexprs

            return launch

    monkeypatch.setattr(module, kernel_name, Capture())
    return seen


def ptx_params(ptx: str, name: str) -> list[str]:
    entry = re.search(rf"\.entry\s+{name}\s*\(([^)]*)\)", ptx)
    assert entry, f"no entry {name} in the PTX"
    return re.findall(r"\.param\s+\.(\w+)", entry.group(1))


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float8_e4m3fn"])
def test_block_attention_compiles_for_hopper(cache_dtype):
    kernel = compile_in_subprocess(
        f"t.block_attention_kernel(torch.bfloat16, torch.{cache_dtype}, head_dim=128, group=4, page=16)"
    )
    params = ptx_params(kernel["ptx"], kernel["name"])
    # 9 input pointers, 20 int32 extra args, the output pointer (then Triton's own scratch pointers)
    assert params[:9] == ["u64"] * 9 and params[9:29] == ["u32"] * 20 and params[29] == "u64"
    assert ".target sm_90" in kernel["ptx"] and kernel["num_threads"] == 128
    assert ("cvt.rn.satfinite.e4m3x2" in kernel["ptx"]) == (cache_dtype == "float8_e4m3fn")


def test_split_kv_variant_compiles_for_hopper():
    """The long-cache variant the torch launcher runs on CUDA (never compiled by the CPU tests, which
    interpret it): three more pointers (counters, partials) and the atomic of its finishing program."""
    kernel = compile_in_subprocess(
        "t.block_attention_kernel(torch.bfloat16, torch.bfloat16, head_dim=128, group=4, page=16, max_len=32768)"
    )
    params = ptx_params(kernel["ptx"], kernel["name"])
    assert params[:12] == ["u64"] * 12 and params[12:32] == ["u32"] * 20 and params[32] == "u64"
    assert re.search(r"atom\.[\w.]*acq_rel", kernel["ptx"])


@pytest.mark.parametrize("row_width", [0, 2], ids=["causal", "quadratic"])
@pytest.mark.parametrize("page, num_blocks, T", [(8, 7, 3), (20, 2, 1)], ids=["paged", "dense"])
def test_block_attention_extra_args_match_the_torch_launcher(monkeypatch, page, num_blocks, T, row_width):
    """The plugin computes strides from shapes; the torch launcher reads them off tensors: same list,
    and the block size the plugin compiles in is the one the launcher passes."""
    from trimode.plugins import block_attention as ba
    from trimode.plugins.attention_tiles import tile_sizes

    b, L, H, Hkv, D = 2, row_width * (row_width + 1) or 4, 4, 2, 16
    q = torch.randn(b, L, H, D)
    k = v = torch.randn(b, L, Hkv, D)
    cache = torch.zeros(num_blocks, Hkv, page, D)
    tables = torch.arange(b * T).view(b, T) % (num_blocks - 1)
    seen = capture_launch(monkeypatch, ba, "_block_attention_kernel")
    ba.launch(q, k, v, cache, cache.clone(), torch.tensor([3, 0]), tables, True, row_width=row_width)
    grid, extra = trt_plugins.block_attention_launch(
        q.shape, cache.shape, tables.shape, 1, row_width, tile_sizes(D, q.device)[0]
    )
    assert extra[1:3] == [1, row_width]  # is_causal, row_width: the node's attributes
    assert seen["args"][6] is tables and seen["constexprs"]["PAGE"] == page
    assert seen["args"][9:12] == (None, None, None)  # short cache: no split-KV scratch, as in the engine
    assert list(seen["args"][12:-1]) == extra and grid[:2] == seen["grid"][:2]


def test_register_plugins_names_the_missing_tensorrt():
    with pytest.raises(RuntimeError, match="TensorRT"):
        trt_plugins.register_plugins()


@pytest.mark.parametrize(
    "op, threshold, num_ints, num_outputs",
    [
        ("spec_accept", None, 6, 4),
        ("diffusion_commit", 0.9, 5, 2),
        ("diffusion_commit", None, 5, 2),  # top-k schedule
    ],
)
def test_sampling_kernels_compile_for_hopper(op, threshold, num_ints, num_outputs):
    """The threshold is compiled in; temperature and seed are input pointers (6 inputs with the
    counters), then the int extra args, then the outputs. One kernel runs greedy and sampled rows:
    Philox (its round constant 0xD2511F53) is compiled in behind a runtime branch, and 1/T is the
    IEEE division."""
    kernel = compile_in_subprocess(f"t.sampling_kernel({op!r}, torch.bfloat16, 131072, 32, {threshold})")
    params = ptx_params(kernel["ptx"], kernel["name"])
    assert params[:6] == ["u64"] * 6 and params[6 : 6 + num_ints] == ["u32"] * num_ints
    assert params[6 + num_ints : 6 + num_ints + num_outputs] == ["u64"] * num_outputs
    assert kernel["num_threads"] == 256
    assert any(c in kernel["ptx"] for c in ("3528531795", "-766435501"))  # as unsigned or signed int32
    assert "div.rn.f32" in kernel["ptx"]
    # no fused multiply-add: the sampled score x * (1/T) + gumbel rounds twice, as in the reference
    assert "fma.rn.f32" not in kernel["ptx"] and "mul.rn.f32" in kernel["ptx"]


@pytest.mark.parametrize("op", ["spec_accept", "diffusion_commit"])
def test_sampling_extra_args_match_the_torch_launchers(op, monkeypatch):
    from trimode.plugins import diffusion_commit, spec_accept

    module, name = (
        (spec_accept, "spec_accept_kernel") if op == "spec_accept" else (diffusion_commit, "diffusion_commit_kernel")
    )
    seen = capture_launch(monkeypatch, module, name)
    logits, block = torch.randn(2, 4, 50), torch.full((2, 4), 3)
    temperature, seed = torch.tensor([0.0, 0.8]), torch.tensor([1, 2])
    if op == "spec_accept":
        module.launch(logits, block, 3, torch.tensor([1, 2]), temperature, seed)
        ints, outputs = seen["args"][6:12], seen["args"][12:]
    else:
        module.launch(logits, block, 3, 0.9, None, temperature, seed)
        ints, outputs = seen["args"][6:11], seen["args"][12:]  # then the threshold, then the outputs
    grid, extra = trt_plugins.sampling_launch(op, logits.shape, 3, num_eos=2)
    assert list(ints) == extra and grid[:2] == seen["grid"]
    # the per-row sampling inputs are pointers 4 and 5, in the ONNX node's input order
    assert torch.equal(seen["args"][3], temperature) and torch.equal(seen["args"][4], seed)
    assert all(isinstance(x, torch.Tensor) for x in seen["args"][:6] + outputs)
    assert len(outputs) == (4 if op == "spec_accept" else 2)
