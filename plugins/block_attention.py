"""block_attention as one OpenAI Triton kernel: a chunk of L queries per sequence against its cached
prefix plus the chunk itself, with the chunk's K/V written into the cache (reference.block_attention).

Paged cache [N, Hkv, PAGE, D]: sequence i's position p is block tables[i, p // PAGE], offset p % PAGE
(kv_cache.py). Every cache access (chunk writes, key reads) goes through the table per position, so a
key tile may span blocks. A dense cache is the case PAGE = max_len, tables = [[row], ...].

One program owns (sequence, KV head, tile of BLOCK_M query rows). GQA is packed into the rows:
row r is chunk token r // GROUP of query head kv_head * GROUP + r % GROUP, so each K/V tile is loaded
once for every query head that shares it.

Visibility, besides the whole prefix: causal (chunk token t sees chunk keys 0..t), block (the whole
chunk) or quadratic (row_width W > 0, reference.quadratic_visibility): each query row sees the keys
before its visible_end and, a mask row only, a second interval: its own row's masks. A tile's key
loop runs up to the furthest key any of its rows sees.

Batch invariance: keys are visited in tiles at fixed absolute positions (0, BLOCK_N, 2 BLOCK_N ...)
and read back from the cache, chunk included, with tile sizes that depend only on the head size and
dtype. A masked key adds exactly zero to the online softmax, so the query at position p gets
bit-identical output whether it arrives alone (AR decode), inside a 32-token verify chunk, as a
verify-chain token of a quadratic chunk, or in a larger batch: this is what keeps self-speculation
== AR on the GPU (spec §7). Where the blocks sit changes no tile: a paged pool and a dense cache of
the same keys and capacity give the same bits.

Split-KV for long caches: a third grid axis splits the keys into fixed absolute ranges of SPLIT_N
(chosen from the capacity T * PAGE of a table row alone), so a batch-1 verify over a 32k prefix runs
on many SMs; the last split of a tile to finish merges the partial softmaxes in split order. A split
a query cannot see contributes exact zeros, so the invariance above holds with splits too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trimode.plugins.attention_tiles import constants
from trimode.plugins.pick import sequence_counters

E4M3 = torch.float8_e4m3fn


@triton.jit
def _round_to_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest E4M3 value, ties to even. Casting an exact grid
    value to float8 is exact everywhere, while the interpreter's own rounding cast is not."""
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = x / quantum
    f = tl.floor(r)
    frac = r - f
    is_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & is_odd)
    return (f + up.to(tl.float32)) * quantum


@triton.jit
def _block_attention_kernel(
    # inputs, int scalars, outputs: the order TensorRT's AOT plugins launch with (tensorrt.py)
    q_ptr,  # [b, L, H, D]
    k_ptr,
    v_ptr,  # [b, L, Hkv, D] the chunk's keys and values
    kc_ptr,
    vc_ptr,  # [N, Hkv, PAGE, D] this layer's blocks: q's dtype, or float8 codes; written in place
    lengths_ptr,  # [b] int64 committed prefix per sequence
    tables_ptr,  # [b, T] int64 each sequence's blocks (row stride s_tb, contiguous along T)
    k_scale_ptr,
    v_scale_ptr,  # [] fp32 (read only when IS_FP8)
    counter_ptr,  # [>= tiles] int32, zero before and after the launch      } split-KV only
    part_acc_ptr,  # [tiles, MAX_SPLITS, BLOCK_M, BLOCK_D] fp32 scratch        } (None when
    part_ml_ptr,  # [tiles, MAX_SPLITS, 2, BLOCK_M] fp32 scratch: max, sum   }  SPLIT_N == 0)
    chunk_len,
    is_causal,
    row_width,  # a quadratic chunk's W (chunk_len = W(W+1)); 0: causal or block by is_causal
    num_kv_heads,
    s_qb,
    s_ql,
    s_qh,
    s_kb,
    s_kl,
    s_kh,
    s_vb,
    s_vl,
    s_vh,
    s_cb,
    s_ch,
    s_cs,
    s_tb,
    s_ob,
    s_ol,
    s_oh,
    out_ptr,  # [b, L, H, D]
    SM_SCALE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    pid_m, pid_bh, pid_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, kv_head = pid_bh // num_kv_heads, pid_bh % num_kv_heads
    length = tl.load(lengths_ptr + seq)
    table = tables_ptr + seq * s_tb
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    kc_head, vc_head = kc_ptr + kv_head * s_ch, vc_ptr + kv_head * s_ch
    if IS_FP8:
        k_scale, v_scale = tl.load(k_scale_ptr), tl.load(v_scale_ptr)
    else:
        k_scale, v_scale = 1.0, 1.0

    # KV rule (spec §4): the chunk's K/V go to positions length .. length+L-1 of the sequence, in
    # its blocks. Every program of this (sequence, KV head) writes the same bytes, then reads them
    # back after a barrier, so no program depends on another one's stores.
    t = tl.arange(0, BLOCK_N)
    for start in range(0, chunk_len, BLOCK_N):
        tok = start + t
        tok_ok = tok < chunk_len
        ok = tok_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_ptr + seq * s_kb + tok[:, None] * s_kl + kv_head * s_kh + d[None, :], mask=ok)
        vt = tl.load(v_ptr + seq * s_vb + tok[:, None] * s_vl + kv_head * s_vh + d[None, :], mask=ok)
        if IS_FP8:
            kt = _round_to_e4m3(tl.minimum(tl.maximum(kt.to(tl.float32) / k_scale, -448.0), 448.0))
            vt = _round_to_e4m3(tl.minimum(tl.maximum(vt.to(tl.float32) / v_scale, -448.0), 448.0))
        slot = _slots(table, length + tok, tok_ok, s_cb, s_cs, PAGE)
        tl.store(kc_head + slot[:, None] + d[None, :], kt.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(vc_head + slot[:, None] + d[None, :], vt.to(vc_ptr.dtype.element_ty), mask=ok)
    tl.debug_barrier()

    # Queries: packed rows (chunk token, head in group).
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_q, head = r // GROUP, kv_head * GROUP + r % GROUP
    row_ok = tok_q < chunk_len
    q = tl.load(
        q_ptr + seq * s_qb + tok_q[:, None] * s_ql + head[:, None] * s_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # Causal: query i sees keys up to length + i; block: the whole chunk. Rows past the chunk act
    # as its last token (they are never stored), so every row sees key 0 and no softmax is empty.
    last_tok = tl.minimum(tok_q, chunk_len - 1)
    visible_end = length + tl.where(is_causal != 0, last_tok + 1, chunk_len)  # [BLOCK_M]
    # Quadratic (reference.quadratic_visibility): tokens 0..W-1 are the causal verify chain; token
    # t >= W is a mask of row i = (t - W) // W, which sees the chain up to t_i and, as a second
    # interval [mask_start, mask_end), the W masks of its own row. Empty for every other row.
    is_mask = (last_tok >= row_width) & (row_width > 0)
    mask_row = (last_tok - row_width) // tl.maximum(row_width, 1)
    visible_end = tl.where(is_mask, length + mask_row + 1, visible_end)
    mask_start = tl.where(is_mask, length + row_width * (mask_row + 1), 0)
    mask_end = tl.where(is_mask, mask_start + row_width, 0)
    tile_end = tl.maximum(tl.max(visible_end, axis=0), tl.max(mask_end, axis=0))

    # Split-KV: program pid_split covers the keys at absolute positions [pid_split * SPLIT_N, +SPLIT_N),
    # so long prefixes spread over many programs; the splits are fixed in absolute positions too.
    key_start, key_end = 0, tile_end
    if SPLIT_N > 0:
        key_start = pid_split * SPLIT_N
        key_end = tl.minimum(tile_end, key_start + SPLIT_N)
    if key_start < tile_end:  # splits past this tile's last visible key have nothing to do
        acc, m_i, l_i = _attend(
            q,
            kc_head,
            vc_head,
            table,
            k_scale,
            v_scale,
            s_cb,
            s_cs,
            d,
            d_ok,
            visible_end,
            mask_start,
            mask_end,
            key_start,
            key_end,
            SM_SCALE,
            PAGE,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            IS_FP8,
            DOT_DTYPE,
            PRECISION,
        )
        out_ptrs = out_ptr + seq * s_ob + tok_q[:, None] * s_ol + head[:, None] * s_oh + d[None, :]
        out_ok = row_ok[:, None] & d_ok[None, :]
        if SPLIT_N == 0:
            tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
        elif tile_end <= SPLIT_N:  # one split: the same stores as without split-KV
            tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
        else:
            num_splits = tl.cdiv(tile_end, SPLIT_N)
            # Last program finishes (as in spec_accept): publish this split's partial softmax, count in;
            # the tile's last split to arrive merges them in split order and resets the counter.
            # A split with no visible key for a row holds max -inf, sum 0, acc 0: it adds exact zeros,
            # so a query's result does not depend on how many splits its tile needed.
            tile = pid_bh * tl.num_programs(0) + pid_m
            rows_m = tl.arange(0, BLOCK_M)
            part = tile * MAX_SPLITS + pid_split
            tl.store(part_acc_ptr + (part * BLOCK_M + rows_m[:, None]) * BLOCK_D + d[None, :], acc)
            tl.store(part_ml_ptr + part * 2 * BLOCK_M + rows_m, m_i)
            tl.store(part_ml_ptr + (part * 2 + 1) * BLOCK_M + rows_m, l_i)
            tl.debug_barrier()
            if tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                tl.store(counter_ptr + tile, 0)
                m = tl.full([BLOCK_M], float("-inf"), tl.float32)
                for split in range(0, num_splits):
                    slot = tile * MAX_SPLITS + split
                    m = tl.maximum(m, tl.load(part_ml_ptr + slot * 2 * BLOCK_M + rows_m, cache_modifier=".cg"))
                acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                for split in range(0, num_splits):
                    slot = tile * MAX_SPLITS + split
                    weight = tl.exp2(tl.load(part_ml_ptr + slot * 2 * BLOCK_M + rows_m, cache_modifier=".cg") - m)
                    l_i += weight * tl.load(part_ml_ptr + (slot * 2 + 1) * BLOCK_M + rows_m, cache_modifier=".cg")
                    acc += weight[:, None] * tl.load(
                        part_acc_ptr + (slot * BLOCK_M + rows_m[:, None]) * BLOCK_D + d[None, :], cache_modifier=".cg"
                    )
                tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _slots(table, pos, ok, s_cb, s_cs, PAGE: tl.constexpr):
    """Element offsets of absolute positions pos [n] in the blocks of one table row (ok [n]: the
    positions to touch; the table is read only there, so a masked position reads nothing)."""
    block = tl.load(table + pos // PAGE, mask=ok, other=0)
    return block * s_cb + (pos % PAGE) * s_cs


@triton.jit
def _attend(
    q,
    kc_head,
    vc_head,
    table,
    k_scale,
    v_scale,
    s_cb,
    s_cs,
    d,
    d_ok,
    visible_end,
    mask_start,
    mask_end,
    key_start,
    key_end,
    SM_SCALE: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax of the queries over cache keys [key_start, key_end) in absolute BLOCK_N tiles,
    each key found through the table (a tile may span several blocks). Row r sees the keys before
    visible_end[r] and those in [mask_start[r], mask_end[r]).
    -> (unnormalised acc [BLOCK_M, BLOCK_D], running max m [BLOCK_M] (base 2), sum l [BLOCK_M])"""
    qk_scale = SM_SCALE * 1.4426950408889634  # log2(e): exp2 below
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(key_start, key_end, BLOCK_N):
        pos = start + n
        pos_ok = pos < key_end
        ok = pos_ok[:, None] & d_ok[None, :]
        slot = _slots(table, pos, pos_ok, s_cb, s_cs, PAGE)
        kt = tl.load(kc_head + slot[:, None] + d[None, :], mask=ok, other=0.0)
        vt = tl.load(vc_head + slot[:, None] + d[None, :], mask=ok, other=0.0)
        if IS_FP8:
            kt = kt.to(tl.float32) * k_scale
            vt = vt.to(tl.float32) * v_scale
        kt, vt = kt.to(q.dtype).to(DOT_DTYPE), vt.to(q.dtype).to(DOT_DTYPE)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(kt), input_precision=PRECISION).to(tl.float32) * qk_scale
        is_visible = (pos[None, :] < visible_end[:, None]) | (
            (pos[None, :] >= mask_start[:, None]) & (pos[None, :] < mask_end[:, None])
        )
        s = tl.where(is_visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no visible key yet keeps max -inf: shift by 0 there instead of -inf (no nan).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype).to(DOT_DTYPE), vt, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    return acc, m_i, l_i


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    tables: torch.Tensor | None,
    is_causal: bool,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    row_width: int = 0,
) -> torch.Tensor:
    """reference.block_attention with the layout given as lengths [b] and block tables [b, T] int64
    (ChunkLayout.block_tables; None = [[0], [1], ..], a dense cache whose rows are the batch), and
    row_width W > 0 for a quadratic chunk of L = W(W+1) tokens (ChunkLayout.row_width).
    The caller keeps lengths + L <= T * P: positions past a table row are not checked (no host sync)."""
    b, L, H, D = q.shape
    _, Hkv, page, _ = k_cache.shape
    if k.shape != (b, L, Hkv, D) or v.shape != k.shape or v_cache.shape != k_cache.shape or k_cache.shape[3] != D:
        raise ValueError(
            f"block_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit"
        )
    if row_width < 0 or (row_width and L != row_width * (row_width + 1)):
        raise ValueError(f"block_attention: a quadratic chunk of row width {row_width} has W(W+1) tokens, not {L}")
    if H % Hkv:
        raise ValueError(f"block_attention: {H} query heads are not a multiple of {Hkv} KV heads")
    is_fp8 = k_cache.dtype == E4M3
    if is_fp8 and (k_scale is None or v_scale is None or v_cache.dtype != E4M3):
        raise ValueError("block_attention: a float8 KV cache needs both caches in float8 and k_scale / v_scale")
    if not is_fp8 and k_cache.dtype != q.dtype:
        raise ValueError(f"block_attention: cache dtype {k_cache.dtype} is neither {q.dtype} nor float8_e4m3fn")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"block_attention: q/k/v must share one of fp32/fp16/bf16, got {q.dtype}/{k.dtype}/{v.dtype}")
    if lengths.shape != (b,):
        raise ValueError(f"block_attention: lengths must be [{b}], got {list(lengths.shape)}")
    if tables is None:
        tables = torch.arange(b, device=q.device)[:, None]
    if tables.dim() != 2 or tables.shape[0] != b or tables.dtype != torch.int64:
        raise ValueError(f"block_attention: tables must be int64 [{b}, T], got {tables.dtype} {list(tables.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("tables", tables)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"block_attention: {name} must be contiguous in its last dimension")
    # without FP8 the scale pointers are never read (IS_FP8 is a constexpr): q stands in for them
    if is_fp8:
        assert k_scale is not None and v_scale is not None  # checked above
        k_scale, v_scale = k_scale.float().reshape(()), v_scale.float().reshape(())
    else:
        k_scale, v_scale = q, q
    out = torch.empty_like(q)
    const = constants(q.dtype, D, H // Hkv, is_fp8, q.device, page, tables.shape[1] * page)
    num_tiles = triton.cdiv(L * (H // Hkv), const["BLOCK_M"])
    counters = part_acc = part_ml = None
    if const["SPLIT_N"]:
        parts = num_tiles * b * Hkv * const["MAX_SPLITS"] * const["BLOCK_M"]
        counters = sequence_counters(q.device, num_tiles * b * Hkv)
        part_acc = torch.empty(parts * const["BLOCK_D"], dtype=torch.float32, device=q.device)
        part_ml = torch.empty(parts * 2, dtype=torch.float32, device=q.device)
    _block_attention_kernel[(num_tiles, b * Hkv, const["MAX_SPLITS"])](
        q,
        k,
        v,
        k_cache,
        v_cache,
        lengths,
        tables,
        k_scale,
        v_scale,
        counters,
        part_acc,
        part_ml,
        L,
        int(is_causal),
        row_width,
        Hkv,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *k_cache.stride()[:3],
        tables.stride(0),
        *out.stride()[:3],
        out,
        **const,
    )
    return out
