"""The per-row pick over the vocabulary, shared by the spec_accept and diffusion_commit kernels.

`pick_row` reduces one row of logits [V] in tiles of BLOCK_V to the token reference.pick_tokens
picks: argmax (first index on ties, mask token excluded), at T > 0 of logits * fp32(1/T) + Gumbel
noise from `tl.rand(seed, index inside the sequence's [L, V] slice)`; optionally with its
confidence softmax(logits)[token] (fp32, untempered).

Temperature and seed are per sequence, loaded by the kernels from [B] tensors (runtime inputs, so
one compiled kernel serves every mix of greedy and sampled sequences). Greedy vs sampled is a
runtime branch on the row's temperature: uniform across the program (every thread reads the same
value), so it never diverges, and a greedy row (T <= 0) never runs Philox. There is no launch-level
"nothing is sampled" constexpr: the branch costs one scalar compare per tile, and a single variant
is what a TensorRT engine embeds.

Both reductions stream: every lane keeps its own running best and its own online max/sum, and the
lanes are combined once at the end, so the loop over V has no cross-thread reduction (with B=1,
L=32 there are only 32 programs, each one's loop is the latency).

The launch side helpers (tile choice, argument checks, the per-sequence counters of the
"last program finishes" pattern) live here too, so both launchers read the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trimode.plugins.reference import sampling_rows

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Both sampling kernels compile with fused multiply-add off (`enable_fp_fusion`): on a GPU Triton
# would fuse the sampled score x * (1/T) + gumbel into one FMA (one rounding, the reference and
# torch round twice), and a 1-ulp difference can flip an argmax. Off, the PTX says mul.rn / add.rn,
# which ptxas does not contract either.
SAMPLING_FP_FUSION = False


@triton.jit
def pick_row(
    row_ptr, offset0, V, mask_token_id, temperature, seed, WITH_CONFIDENCE: tl.constexpr, BLOCK_V: tl.constexpr
):
    """row_ptr: [V] logits of one row; offset0: its flat index l*V inside its sequence's [L, V]
    logits (the Philox offset, int32); temperature fp32 and seed int64: the sequence's.
    -> (token int32, confidence fp32; 0.0 unless WITH_CONFIDENCE)"""
    is_sampled = temperature > 0
    # IEEE division (a plain '/' is approximate on the GPU): the reference's fp32 1/T exactly
    inv_temperature = tl.math.div_rn(1.0, tl.where(is_sampled, temperature, 1.0))
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane: best score so far
    best_index = tl.zeros([BLOCK_V], tl.int32)
    lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane: online softmax max / sum
    lane_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        is_valid = offs < V
        x = tl.load(row_ptr + offs, mask=is_valid, other=float("-inf")).to(tl.float32)
        score = x
        if is_sampled:  # sampled row
            # Same fp32 ops in the same order as the reference: x * fp32(1/T) + gumbel.
            gumbel = -tl.log(-tl.log(tl.rand(seed, offset0 + offs)))
            score = x * inv_temperature + gumbel
        score = tl.where(is_valid & (offs != mask_token_id), score, float("-inf"))
        # Strict '>': a lane sees its indices in increasing order, so it keeps the first maximum.
        is_better = score > best
        best = tl.where(is_better, score, best)
        best_index = tl.where(is_better, offs, best_index)
        if WITH_CONFIDENCE:
            # One exp per element, exp(min - max): the old sum's rescale when x is a new max,
            # else x's own term. An x of -inf adds exp(-inf - 0) = 0 (never -inf - -inf = nan).
            is_new_max = x > lane_max
            new_max = tl.maximum(lane_max, x)
            e = tl.exp(tl.minimum(lane_max, x) - tl.where(x == float("-inf"), 0.0, new_max))
            lane_sum = tl.where(is_new_max, lane_sum * e + 1.0, lane_sum + e)
            lane_max = new_max
    top = tl.max(best, axis=0)
    # The first index among the lanes' maxima (all -inf: index 0, as torch.argmax).
    token = tl.min(tl.where(best == top, best_index, V), axis=0)
    confidence = tl.full([], 0.0, tl.float32)
    if WITH_CONFIDENCE:
        row_max = tl.max(lane_max, axis=0)
        row_sum = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)
        confidence = tl.exp(tl.load(row_ptr + token).to(tl.float32) - row_max) / row_sum
    return token, confidence


# --- launch side -----------------------------------------------------------------------------------


def tile_config(device: torch.device, vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). GPU: 4096-wide tiles, 16 values per thread in flight per step.
    Interpreter: 128, so the small test vocabularies still span several tiles."""
    cap, num_warps = (4096, 8) if device.type == "cuda" else (128, 4)
    return min(cap, triton.next_power_of_2(vocab_size)), num_warps


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def sequence_counters(device: torch.device, num_sequences: int) -> torch.Tensor:
    """int32 [>= num_sequences], zero between launches: each launch's finishing programs reset
    their counter, so one buffer serves every launch on a stream (one per stream, so concurrent
    streams never share a counter). Grown, never shrunk."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counters = _COUNTERS.get((device, stream))
    if counters is None or counters.numel() < num_sequences:
        counters = torch.zeros(max(num_sequences, 64), dtype=torch.int32, device=device)
        _COUNTERS[(device, stream)] = counters
    return counters


def check_logits(logits: torch.Tensor, tokens: torch.Tensor, mask_token_id: int, names: tuple[str, str]) -> None:
    """The checks both launchers share: logits [b, L, V] float, tokens [b, L] int64, one device."""
    logits_name, tokens_name = names
    if logits.dim() != 3 or logits.shape[1] == 0 or logits.dtype not in LOGITS_DTYPES:
        raise ValueError(
            f"{logits_name}: expected [b, L >= 1, V] float32/bfloat16/float16, got {list(logits.shape)} {logits.dtype}"
        )
    if tokens.shape != logits.shape[:2] or tokens.dtype != torch.int64:
        raise ValueError(
            f"{tokens_name}: expected int64 {list(logits.shape[:2])}, got {tokens.dtype} {list(tokens.shape)}"
        )
    if tokens.device != logits.device:
        raise ValueError(f"{tokens_name} is on {tokens.device}, {logits_name} on {logits.device}")
    if logits.stride(2) != 1:
        raise ValueError(f"{logits_name}: the vocabulary dimension must be contiguous")
    if logits.shape[1] * logits.shape[2] >= 2**31:
        raise ValueError(
            f"{logits_name}: L*V = {logits.shape[1] * logits.shape[2]} >= 2**31 "
            "(Philox offsets, per sequence, are int32)"
        )
    if not 0 <= mask_token_id < logits.shape[2]:
        raise ValueError(f"mask_token_id {mask_token_id} outside the vocabulary 0..{logits.shape[2] - 1}")


def sampling_inputs(
    temperature: torch.Tensor | float, seed: torch.Tensor | int, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """temperature [b] float32, seed [b] int64 (or one Python float / int for all rows), checked
    and contiguous on the logits' device: the kernels load element pid_b."""
    temperature, seed = sampling_rows(temperature, seed, logits.shape[0], logits.device)
    return temperature.contiguous(), seed.contiguous()
