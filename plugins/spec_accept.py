"""spec_accept kernel: the verify tokens and accepted length of a drafted block (spec §7), one launch.

Program (l, b) picks a_l from verify_logits[b, l] (pick.pick_row: argmax, or Gumbel-max keyed by
seed[b] when temperature[b] > 0; mask token excluded). The last program of sequence b to finish
then applies the acceptance rule to its L tokens: n = 1 + the number of leading i in 0..L-2 with
a_i == draft[b, i+1], next seed = a_(n-1), is_eos = an EOS id among a_0 .. a_(n-1). Semantics:
reference.spec_accept.
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
from trimode.plugins.reference import Accepted


@triton.jit
def spec_accept_kernel(
    # inputs, int scalars, outputs: the order TensorRT's AOT plugins launch with (tensorrt.py):
    # the input pointers in the ONNX node's input order, the int extra args, the output pointers
    logits_ptr,  # [B, L, V] fp32 / bf16 / fp16, vocabulary contiguous
    draft_ptr,  # [B, L] int64: s, d1 .. d(L-1)
    eos_ptr,  # [E] int64 EOS ids (any int64 pointer when E == 0)
    temperature_ptr,  # [B] fp32 per sequence: > 0 samples, else greedy
    seed_ptr,  # [B] int64 per sequence: the Philox key
    counter_ptr,  # [>= B] int32, zero before and after the launch
    stride_b,
    stride_l,
    L,
    V,
    num_eos,
    mask_token_id,
    tokens_ptr,  # [B, L] int64 out: a_i; also the row results the finishing program reads
    n_ptr,  # [B] int64 out
    next_seed_ptr,  # [B] int64 out
    is_eos_ptr,  # [B] uint8 out (a bool tensor's bytes)
    BLOCK_V: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_l, pid_b = tl.program_id(0), tl.program_id(1)
    row = pid_b * L + pid_l
    row_ptr = logits_ptr + pid_b.to(tl.int64) * stride_b + pid_l.to(tl.int64) * stride_l
    # the sequence's own sampling parameters; Philox offsets index its [L, V] slice only
    temperature, seed = tl.load(temperature_ptr + pid_b), tl.load(seed_ptr + pid_b)
    token, _ = pick_row(row_ptr, pid_l * V, V, mask_token_id, temperature, seed, False, BLOCK_V)
    tl.store(tokens_ptr + row, token.to(tl.int64))

    # Last program finishes: one launch does both the per-row vocabulary reductions and the
    # per-sequence rule, with no grid-wide sync. Every program publishes its row result, then
    # counts itself in with an acq_rel atomic (the barrier first, so all of this program's
    # threads have stored). The one that sees L-1 came last: every row of its sequence is
    # written, so it reads them (.cg: from L2, never a stale L1 line) and resets the counter
    # to 0 for the next launch.
    tl.debug_barrier()
    num_done = tl.atomic_add(counter_ptr + pid_b, 1, sem="acq_rel", scope="gpu")
    if num_done == L - 1:
        tl.store(counter_ptr + pid_b, 0)
        i = tl.arange(0, BLOCK_L)
        a = tl.load(tokens_ptr + pid_b * L + i, mask=i < L, other=-1, cache_modifier=".cg")
        # the acceptance rule: a_i (i < L-1) verifies draft d(i+1)
        d_next = tl.load(draft_ptr + pid_b * L + i + 1, mask=i < L - 1, other=-1)
        is_mismatch = (i < L - 1) & (a != d_next)
        n = tl.min(tl.where(is_mismatch, i, L - 1), axis=0) + 1
        next_seed = tl.sum(tl.where(i == n - 1, a, 0), axis=0)
        is_emitted_eos = tl.zeros([BLOCK_L], tl.int1)
        for e in range(0, num_eos):
            is_emitted_eos = is_emitted_eos | (a == tl.load(eos_ptr + e))
        is_emitted_eos = is_emitted_eos & (i < n)
        tl.store(n_ptr + pid_b, n.to(tl.int64))
        tl.store(next_seed_ptr + pid_b, next_seed)
        tl.store(is_eos_ptr + pid_b, (tl.max(is_emitted_eos.to(tl.int32), axis=0) > 0).to(tl.uint8))


def launch(
    verify_logits: torch.Tensor,
    draft: torch.Tensor,
    mask_token_id: int,
    eos_ids: torch.Tensor,
    temperature: torch.Tensor | float = 0.0,
    seed: torch.Tensor | int = 0,
) -> Accepted:
    """See reference.spec_accept. verify_logits [b, L, V], draft [b, L] int64, eos_ids [E] int64,
    temperature [b] float32, seed [b] int64 (or one Python float / int for every row)."""
    check_logits(verify_logits, draft, mask_token_id, ("verify_logits", "draft"))
    temperature, seed = sampling_inputs(temperature, seed, verify_logits)
    if eos_ids.dim() != 1 or eos_ids.dtype != torch.int64 or eos_ids.device != draft.device:
        raise ValueError(
            f"eos_ids: expected int64 [E] on {draft.device}, "
            f"got {eos_ids.dtype} {list(eos_ids.shape)} on {eos_ids.device}"
        )
    b, length, vocab_size = verify_logits.shape
    draft, eos_ids = draft.contiguous(), eos_ids.contiguous()
    tokens = torch.empty_like(draft)
    n, next_seed = draft.new_empty(b), draft.new_empty(b)
    is_eos = torch.empty(b, dtype=torch.bool, device=draft.device)
    if b == 0:
        return Accepted(tokens, n, next_seed, is_eos)
    block_v, num_warps = tile_config(verify_logits.device, vocab_size)
    spec_accept_kernel[(length, b)](
        verify_logits,
        draft,
        eos_ids if eos_ids.numel() else draft,
        temperature,
        seed,
        sequence_counters(verify_logits.device, b),
        verify_logits.stride(0),
        verify_logits.stride(1),
        length,
        vocab_size,
        eos_ids.numel(),
        mask_token_id,
        tokens,
        n,
        next_seed,
        is_eos.view(torch.uint8),
        BLOCK_V=block_v,
        BLOCK_L=triton.next_power_of_2(length),
        num_warps=num_warps,
        enable_fp_fusion=SAMPLING_FP_FUSION,
    )
    return Accepted(tokens, n, next_seed, is_eos)
