"""diffusion_commit kernel: one denoising step's candidates, confidences and commit (spec §6), one launch.

Program (l, b) handles position l of sequence b: if it is masked, it picks the candidate x0 from
logits[b, l] (pick.pick_row, with sequence b's temperature and seed) with its confidence
softmax(logits)[x0]; an already committed position skips the vocabulary. The last program of
sequence b to finish ranks the masked positions by confidence (descending, first position on ties)
and commits: rank 0 and every confidence >= threshold (threshold mode) or the num_commit[b] best
(top-k mode). Semantics: reference.diffusion_commit; the input block is not modified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trimode.plugins.pick import (
    SAMPLING_FP_FUSION,
    check_logits,
    pick_row,
    sampling_inputs,
    sequence_counters,
    tile_config,
)


@triton.jit
def diffusion_commit_kernel(
    # inputs, int scalars, outputs: the order TensorRT's AOT plugins launch with (tensorrt.py):
    # the input pointers in the ONNX node's input order, the int extra args, the output pointers;
    # threshold (a node attribute) is compiled in there as a constant
    logits_ptr,  # [B, L, V] fp32 / bf16 / fp16, vocabulary contiguous
    block_ptr,  # [B, L] int64 current block
    num_commit_ptr,  # [B] int64 / int32 positions to commit (read in top-k mode only)
    temperature_ptr,  # [B] fp32 per sequence: > 0 samples, else greedy
    seed_ptr,  # [B] int64 per sequence: the Philox key
    counter_ptr,  # [>= B] int32, zero before and after the launch
    stride_b,
    stride_l,
    L,
    V,
    mask_token_id,
    threshold,
    out_ptr,  # [B, L] int64 out: the new block; holds x0 per row until the finish
    confidence_ptr,  # [B, L] fp32 out: the confidences (-inf where not masked)
    IS_TOP_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_l, pid_b = tl.program_id(0), tl.program_id(1)
    row = pid_b * L + pid_l
    token = tl.load(block_ptr + row)
    confidence = tl.full([], float("-inf"), tl.float32)
    if token == mask_token_id:  # only masked positions need the vocabulary
        row_ptr = logits_ptr + pid_b.to(tl.int64) * stride_b + pid_l.to(tl.int64) * stride_l
        # the sequence's own sampling parameters; Philox offsets index its [L, V] slice only
        temperature, seed = tl.load(temperature_ptr + pid_b), tl.load(seed_ptr + pid_b)
        x0, confidence = pick_row(row_ptr, pid_l * V, V, mask_token_id, temperature, seed, True, BLOCK_V)
        token = x0.to(tl.int64)
    tl.store(out_ptr + row, token)
    tl.store(confidence_ptr + row, confidence)

    # Last program finishes: one launch does both the per-row vocabulary reductions and the
    # per-sequence commit rule, with no grid-wide sync. Every program publishes its row result,
    # then counts itself in with an acq_rel atomic (the barrier first, so all of this program's
    # threads have stored). The one that sees L-1 came last: every row of its sequence is
    # written, so it reads them (.cg: from L2, never a stale L1 line) and resets the counter
    # to 0 for the next launch.
    tl.debug_barrier()
    num_done = tl.atomic_add(counter_ptr + pid_b, 1, sem="acq_rel", scope="gpu")
    if num_done == L - 1:
        tl.store(counter_ptr + pid_b, 0)
        i = tl.arange(0, BLOCK_L)
        is_row = i < L
        block = tl.load(block_ptr + pid_b * L + i, mask=is_row, other=0)
        x0 = tl.load(out_ptr + pid_b * L + i, mask=is_row, other=0, cache_modifier=".cg")
        conf = tl.load(confidence_ptr + pid_b * L + i, mask=is_row, other=float("-inf"), cache_modifier=".cg")
        is_masked = is_row & (block == mask_token_id)
        # the commit rule: rank = positions ahead in a stable descending sort, [L, L] -> [L]
        # (unmasked positions hold -inf, so they never rank ahead of a masked one)
        conf_l, conf_j = conf[:, None], conf[None, :]
        is_ahead = (conf_j > conf_l) | ((conf_j == conf_l) & (i[None, :] < i[:, None]))
        rank = tl.sum(is_ahead.to(tl.int32), axis=1)
        if IS_TOP_K:
            is_commit = rank < tl.load(num_commit_ptr + pid_b)
        else:
            is_commit = (rank == 0) | (conf >= threshold)
        tl.store(out_ptr + pid_b * L + i, tl.where(is_masked & is_commit, x0, block), mask=is_row)


def launch(
    logits: torch.Tensor,
    block: torch.Tensor,
    mask_token_id: int,
    threshold: float | None,
    num_commit: torch.Tensor | None,
    temperature: torch.Tensor | float = 0.0,
    seed: torch.Tensor | int = 0,
) -> torch.Tensor:
    """See reference.diffusion_commit. logits [b, L, V], block [b, L] int64, num_commit [b] int
    (used when threshold is None), temperature [b] float32, seed [b] int64 (or one Python float /
    int for every row) -> the new block [b, L]."""
    check_logits(logits, block, mask_token_id, ("logits", "block"))
    temperature, seed = sampling_inputs(temperature, seed, logits)
    b, length, vocab_size = logits.shape
    if threshold is None and (
        num_commit is None
        or num_commit.shape != (b,)
        or num_commit.dtype not in (torch.int64, torch.int32)
        or num_commit.device != block.device
    ):
        got = "None" if num_commit is None else f"{num_commit.dtype} {list(num_commit.shape)} on {num_commit.device}"
        raise ValueError(f"num_commit: without a threshold, expected int64/int32 [{b}] on {block.device}; got {got}")
    block = block.contiguous()
    # read in top-k mode only (no threshold: num_commit was checked above)
    num_commit = num_commit.contiguous() if threshold is None and num_commit is not None else block
    out = torch.empty_like(block)
    if b == 0:
        return out
    confidence = torch.empty(block.shape, dtype=torch.float32, device=block.device)
    block_v, num_warps = tile_config(logits.device, vocab_size)
    diffusion_commit_kernel[(length, b)](
        logits,
        block,
        num_commit,
        temperature,
        seed,
        sequence_counters(logits.device, b),
        logits.stride(0),
        logits.stride(1),
        length,
        vocab_size,
        mask_token_id,
        0.0 if threshold is None else float(threshold),
        out,
        confidence,
        IS_TOP_K=threshold is None,
        BLOCK_V=block_v,
        BLOCK_L=triton.next_power_of_2(length),
        num_warps=num_warps,
        enable_fp_fusion=SAMPLING_FP_FUSION,
    )
    return out
