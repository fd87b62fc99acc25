"""TensorRT plugins for the three ops: quickly deployable plugins (TensorRT >= 10.9, `tensorrt.plugin`)
with ahead-of-time implementations. At engine build the op's Triton kernel is compiled to PTX and
embedded in the engine, so the engine launches it with no Python at run time.

The exported ONNX graph (onnx_ops.py) names each node after its plugin (`trimode::BlockAttention` ...)
with `plugin_namespace="trimode"`, `plugin_version="1"` and `aot=1`; TensorRT's ONNX parser turns the
node into the plugin registered here. Every kernel takes its arguments in the order TensorRT launches
AOT plugins with: input pointers (in the node's input order), int scalars (the "extra args",
symbolic in the input shapes, or the node's int attributes), output pointers. Float attributes
(threshold) are compiled in as constexprs; per-sequence sampling parameters (temperature [b] fp32,
seed [b] int64) are inputs, so one engine serves any mix of greedy and sampled sequences with their
own seeds.

What runs without TensorRT (and is tested on CPU): the AOT compile of each kernel to PTX for a
given GPU, its launch grid and extra args from the input shapes. `register_plugins()` needs TensorRT
itself, which no machine here can install (notes/stack.md): it is untested until one can.

In-place KV cache: the BlockAttention kernel writes the chunk's K/V into its cache inputs (the
blocks its tables input names), as the torch op does, and the plugin's only output is the attention
output. The block size is a constexpr: the engine's pool has one, fixed at build. The ONNX node (functional)
also returns the updated caches: the builder must drop those two outputs, or bind them to the
input buffers, when it maps the node onto this plugin; that step is open (it needs TensorRT).
SpecAccept and DiffusionCommit take their per-sequence counters as an input the graph zeroes on
every call, so the engine keeps no state for them.

Launch order of the sampling kernels (the plugin inputs, then extra args, then outputs):
  SpecAccept       verify_logits, draft, eos_ids, temperature, seed, counters |
                   L*V, V, L, V, num_eos, mask_token_id | tokens, n, next_seed, is_eos
  DiffusionCommit  logits, block, num_commit, temperature, seed, counters |
                   L*V, V, L, V, mask_token_id | new block, confidence
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NAMESPACE = "trimode"
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
}


@dataclass(frozen=True)
class AotKernel:
    """What an AOT plugin hands TensorRT: the kernel's name and PTX, and its launch shape."""

    name: str
    ptx: str
    num_threads: int
    shared_mem: int


def compile_kernel(
    fn,
    pointer_types: dict[str, torch.dtype],
    constexprs: dict,
    capability: tuple[int, int],
    num_warps: int = 4,
    enable_fp_fusion: bool = True,
) -> AotKernel:
    """Compile a @triton.jit kernel for an NVIDIA GPU of this compute capability (no GPU needed).
    Pointer arguments get their element type from pointer_types; other non-constexpr ones are i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for param in fn.params:
        if param.name in constexprs:
            signature[param.name] = "constexpr"
        elif param.name in pointer_types:
            signature[param.name] = "*" + TRITON_TYPES[pointer_types[param.name]]
        else:
            signature[param.name] = "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    major, minor = capability
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", major * 10 + minor, 32),
        options={"num_warps": num_warps, "enable_fp_fusion": enable_fp_fusion},
    )
    return AotKernel(
        compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps * 32, compiled.metadata.shared
    )


# --- block_attention ----------------------------------------------------------------------------------


def block_attention_kernel(
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    head_dim: int,
    group: int,
    page: int,
    capability: tuple[int, int] = (9, 0),
    max_len: int = 0,
) -> AotKernel:
    """The engine's kernel for caches of `page` positions a block: max_len 0, no split-KV and no
    scratch pointers. A max_len (T * page) compiles the split-KV variant the torch launcher uses on
    long caches (tests compile it for the GPU that way)."""
    from trimode.plugins import attention_tiles
    from trimode.plugins import block_attention as ba

    pointers = {
        "q_ptr": dtype,
        "k_ptr": dtype,
        "v_ptr": dtype,
        "kc_ptr": cache_dtype,
        "vc_ptr": cache_dtype,
        "lengths_ptr": torch.int64,
        "tables_ptr": torch.int64,
        "k_scale_ptr": torch.float32,
        "v_scale_ptr": torch.float32,
        "out_ptr": dtype,
        "counter_ptr": torch.int32,
        "part_acc_ptr": torch.float32,
        "part_ml_ptr": torch.float32,
    }
    is_fp8 = cache_dtype == torch.float8_e4m3fn
    constants = attention_tiles.constants(dtype, head_dim, group, is_fp8, torch.device("cuda"), page, max_len)
    if not constants["SPLIT_N"]:
        constants.update(counter_ptr=None, part_acc_ptr=None, part_ml_ptr=None)
    return compile_kernel(ba._block_attention_kernel, pointers, constants, capability)


def block_attention_launch(
    q_shape,
    cache_shape,
    tables_shape,
    is_causal: int,
    row_width: int,
    block_m: int,
    cdiv: Callable = lambda a, b: -(-a // b),
) -> tuple[tuple, list]:
    """Grid and extra args from the input shapes (ints here, TensorRT's symbolic exprs in the plugin):
    q [b, L, H, D], the caches [N, Hkv, P, D] and the tables [b, T], all contiguous; is_causal and
    row_width are the node's attributes."""
    b, L, H, D = q_shape
    _, Hkv, P, _ = cache_shape
    q_strides = (L * H * D, H * D, D)
    kv_strides = (L * Hkv * D, Hkv * D, D)
    cache_strides = (Hkv * P * D, P * D, D)
    table_stride = tables_shape[1]
    scalars = [L, is_causal, row_width, Hkv]
    extra = [*scalars, *q_strides, *kv_strides, *kv_strides, *cache_strides, table_stride, *q_strides]
    return (cdiv(L * (H // Hkv), block_m), b * Hkv, 1), extra


# --- spec_accept and diffusion_commit ---------------------------------------------------------------------
# One program per (position, sequence); the per-sequence finish needs a zeroed int32 counter per
# sequence as an input (the kernels leave it zeroed again).


def sampling_kernel(
    op: str,
    logits_dtype: torch.dtype,
    vocab_size: int,
    length: int,
    threshold: float | None = 0.9,
    capability: tuple[int, int] = (9, 0),
) -> AotKernel:
    """op "spec_accept" or "diffusion_commit"; the threshold is compiled in, temperature and seed
    are per-sequence input tensors (one kernel for greedy and sampled sequences alike)."""
    import triton

    from trimode.plugins import diffusion_commit, spec_accept
    from trimode.plugins.pick import SAMPLING_FP_FUSION, tile_config

    block_v, num_warps = tile_config(torch.device("cuda"), vocab_size)
    constexprs = dict(BLOCK_V=block_v, BLOCK_L=triton.next_power_of_2(length))
    pointers = {
        "logits_ptr": logits_dtype,
        "temperature_ptr": torch.float32,
        "seed_ptr": torch.int64,
        "counter_ptr": torch.int32,
    }
    if op == "spec_accept":
        fn = spec_accept.spec_accept_kernel
        pointers.update(
            draft_ptr=torch.int64,
            eos_ptr=torch.int64,
            tokens_ptr=torch.int64,
            n_ptr=torch.int64,
            next_seed_ptr=torch.int64,
            is_eos_ptr=torch.uint8,
        )
    else:
        fn = diffusion_commit.diffusion_commit_kernel
        constexprs.update(threshold=0.0 if threshold is None else threshold, IS_TOP_K=threshold is None)
        pointers.update(
            block_ptr=torch.int64, num_commit_ptr=torch.int64, out_ptr=torch.int64, confidence_ptr=torch.float32
        )
    return compile_kernel(fn, pointers, constexprs, capability, num_warps, enable_fp_fusion=SAMPLING_FP_FUSION)


def sampling_launch(op: str, logits_shape, mask_token_id: int, num_eos: int = 0) -> tuple[tuple, list]:
    """Grid and int extra args from logits [b, L, V] (contiguous)."""
    b, L, V = logits_shape
    extra = [L * V, V, L, V] + ([num_eos] if op == "spec_accept" else []) + [mask_token_id]
    return (L, b, 1), extra


# --- registration (needs TensorRT) --------------------------------------------------------------------


def register_plugins() -> None:
    """Register trimode::BlockAttention, SpecAccept and DiffusionCommit with TensorRT's plugin registry."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise RuntimeError(
            "TensorRT plugins need TensorRT >= 10.9 (`tensorrt` from NVIDIA's index; not installable on these machines)"
        ) from e

    torch_dtype = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.fp8: torch.float8_e4m3fn,
    }

    @trtp.register(f"{NAMESPACE}::BlockAttention")
    def _describe(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        k_cache: trtp.TensorDesc,
        v_cache: trtp.TensorDesc,
        lengths: trtp.TensorDesc,
        tables: trtp.TensorDesc,
        k_scale: trtp.TensorDesc,
        v_scale: trtp.TensorDesc,
        is_causal: int,
        row_width: int,
    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.aot_impl(f"{NAMESPACE}::BlockAttention")
    def _aot(
        q, k, v, k_cache, v_cache, lengths, tables, k_scale, v_scale, is_causal: int, row_width: int, outputs, tactic
    ):
        # head_dim, the KV heads and the block size are build-time constants of the engine's pool
        head_dim, num_kv_heads, page = int(q.shape_expr[3]), int(k_cache.shape_expr[1]), int(k_cache.shape_expr[2])
        group = int(q.shape_expr[2]) // num_kv_heads
        kernel = block_attention_kernel(
            torch_dtype[q.dtype],
            torch_dtype[k_cache.dtype],
            head_dim,
            group,
            page,
            torch.cuda.get_device_capability(),
        )
        from trimode.plugins.attention_tiles import tile_sizes

        return _launch_params(
            trtp,
            kernel,
            block_attention_launch(
                q.shape_expr,
                k_cache.shape_expr,
                tables.shape_expr,
                is_causal,
                row_width,
                tile_sizes(head_dim, torch.device("cuda"))[0],
                trtp.cdiv,
            ),
        )

    @trtp.register(f"{NAMESPACE}::SpecAccept")
    def _describe_accept(
        verify_logits: trtp.TensorDesc,
        draft: trtp.TensorDesc,
        eos_ids: trtp.TensorDesc,
        temperature: trtp.TensorDesc,
        seed: trtp.TensorDesc,
        counters: trtp.TensorDesc,
        mask_token_id: int,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        b = draft.shape_expr[0]
        return (
            draft.like(),
            trtp.from_shape_expr((b,), dtype=trt.int64),
            trtp.from_shape_expr((b,), dtype=trt.int64),
            trtp.from_shape_expr((b,), dtype=trt.uint8),
        )

    @trtp.aot_impl(f"{NAMESPACE}::SpecAccept")
    def _aot_accept(verify_logits, draft, eos_ids, temperature, seed, counters, mask_token_id: int, outputs, tactic):
        b, L, V = verify_logits.shape_expr
        kernel = sampling_kernel(
            "spec_accept",
            torch_dtype[verify_logits.dtype],
            int(V),
            int(L),
            capability=torch.cuda.get_device_capability(),
        )
        return _launch_params(
            trtp, kernel, sampling_launch("spec_accept", (b, L, V), mask_token_id, eos_ids.shape_expr[0])
        )

    @trtp.register(f"{NAMESPACE}::DiffusionCommit")
    def _describe_commit(
        logits: trtp.TensorDesc,
        block: trtp.TensorDesc,
        num_commit: trtp.TensorDesc,
        temperature: trtp.TensorDesc,
        seed: trtp.TensorDesc,
        counters: trtp.TensorDesc,
        mask_token_id: int,
        threshold: float,
        use_threshold: int,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return block.like(), trtp.from_shape_expr(block.shape_expr, dtype=trt.float32)

    @trtp.aot_impl(f"{NAMESPACE}::DiffusionCommit")
    def _aot_commit(
        logits,
        block,
        num_commit,
        temperature,
        seed,
        counters,
        mask_token_id: int,
        threshold: float,
        use_threshold: int,
        outputs,
        tactic,
    ):
        b, L, V = logits.shape_expr
        kernel = sampling_kernel(
            "diffusion_commit",
            torch_dtype[logits.dtype],
            int(V),
            int(L),
            threshold if use_threshold else None,
            torch.cuda.get_device_capability(),
        )
        return _launch_params(trtp, kernel, sampling_launch("diffusion_commit", (b, L, V), mask_token_id))


def _launch_params(trtp, kernel: AotKernel, launch: tuple[tuple, list]):
    """The AOT impl's return value: kernel name, PTX, launch parameters, symbolic int extra args."""
    grid, extra = launch
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x, params.shared_mem = kernel.num_threads, kernel.shared_mem
    args = trtp.SymIntExprs(len(extra))
    for i, e in enumerate(extra):
        args[i] = trtp.SymInt32(e)
    return kernel.name, kernel.ptx, params, args
