"""The block_attention kernel's compile-time choices (its constexprs): tile sizes, split-KV and the dot
product's precision, shared by the launcher (block_attention.launch) and the TensorRT AOT compile
(tensorrt.py). Each is a function of the head size, dtype, device and a table row's capacity alone,
never of the batch or the chunk (block_attention.py: batch invariance).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def tile_sizes(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): fixed per head size and device, never per batch or chunk length
    (batch invariance). Small tiles under the CPU interpreter, where every element costs."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return 16, 64, block_d
    return 64, 64, block_d


def split_size(max_len: int, device: torch.device) -> int:
    """Keys per split-KV program (0 = no split). A function of the capacity of a table row alone
    (max_len = T * PAGE positions), never of the batch, the chunk or where the blocks sit, so a
    sequence's results stay the same from one call to the next. GPU: at most 16 splits, of 512 keys
    or more; interpreter: 128, so small tests cross split boundaries."""
    if device.type != "cuda":
        return 0 if max_len <= 128 else 128
    return 0 if max_len <= 1024 else max(512, triton.next_power_of_2(triton.cdiv(max_len, 16)))


def constants(
    dtype: torch.dtype, head_dim: int, group: int, is_fp8: bool, device: torch.device, page: int, max_len: int = 0
) -> dict:
    """The kernel's constexpr arguments (shared by the launcher and the TensorRT AOT compile, which
    passes max_len 0: no split-KV, so the engine needs no scratch). page: positions per cache block
    (k_cache.shape[2]); max_len: positions a table row addresses (T * page)."""
    block_m, block_n, block_d = tile_sizes(head_dim, device)
    split_n = split_size(max_len, device) if max_len else 0
    return dict(
        SPLIT_N=split_n,
        MAX_SPLITS=triton.cdiv(max_len, split_n) if split_n else 1,
        SM_SCALE=1.0 / math.sqrt(head_dim),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE=page,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IS_FP8=is_fp8,
        # The CPU interpreter multiplies bf16 tiles wrongly (triton 3.7), and its fp32 tiles go to
        # numpy's BLAS, whose sum order depends on a row's place in the tile on some CPUs (AMD EPYC,
        # OpenBLAS 0.3.23): it gets exact fp64 copies, whose products are exact and whose sums round
        # to the same fp32 wherever the row sits, so batch invariance is testable on CPU.
        DOT_DTYPE=tl.float64 if device.type != "cuda" else _TL_DTYPES[dtype],
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
