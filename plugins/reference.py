"""Pure-torch references for the three hot-path ops: they state the math and are the oracle.

block_attention   attention of a chunk over the cached prefix plus itself (spec §4)
spec_accept       verify tokens and the accepted length of a drafted block (spec §7)
diffusion_commit  candidates, confidences and the commit rule of one denoising step (spec §6)

Sampling parameters are per row (one row = one sequence): temperature [b] fp32 and seed [b] int64.
A row with temperature > 0 is Gumbel-max with counter-based noise: uniform u = Philox4x32-10 keyed
by the row's seed at counter = the flat index into the row's own [..., V] slice (l*V + v for
[b, L, V]), the stream OpenAI Triton's `tl.rand(seed, offset)` draws. So a kernel and its reference
sample the same tokens, and a row samples the same tokens whichever rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trimode.fp8 import quantize_e4m3
from trimode.kv_cache import position_index, span_index


def quadratic_offsets(width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[W(W+1)] each token's position past the prefix in a quadratic chunk (spec/quadratic.md):
    the verify chain t_0 .. t_(W-1) at 0 .. W-1, then row i's masks (columns c = 1 .. W) at i + c."""
    rows, cols = torch.meshgrid(torch.arange(width), torch.arange(1, width + 1), indexing="ij")
    return torch.cat([torch.arange(width), (rows + cols).flatten()]).to(device)


def chunk_offsets(length: int, row_width: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """[L] each chunk token's position past the prefix: 0..L-1, or a quadratic chunk's (row_width W > 0)."""
    return quadratic_offsets(row_width, device) if row_width else torch.arange(length, device=device)


def quadratic_tokens(chain: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """chain [b, W] (the verify chain) -> [b, W(W+1)] the quadratic chunk: the chain, then W rows of W masks."""
    width = chain.shape[1]
    return torch.cat([chain, torch.full_like(chain, mask_token_id).repeat(1, width)], dim=1)


def quadratic_visibility(width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[C, C] bool, C = W(W+1): which chunk tokens a chunk token sees (besides the whole prefix).
    The verify chain is causal; a mask of row i sees t_0 .. t_i and every mask of row i; nothing
    sees another row's masks. A function of the two indices only: what a kernel computes."""
    chunk = torch.arange(width * (width + 1))
    row = torch.where(chunk < width, -1, (chunk - width) // width)  # -1: the verify chain
    q, k = chunk[:, None], chunk[None, :]
    chain = (row[:, None] < 0) & (k <= q)
    mask_row = (row[:, None] >= 0) & ((k <= row[:, None]) | (row[None, :] == row[:, None]))
    return (chain | mask_row).to(device)


@dataclass(frozen=True)
class ChunkLayout:
    """Where a chunk of L tokens per row sits, shared by every layer of one forward pass.
    span and mask are computed on first use (then cached for the other layers): only the torch
    reference needs them, and they are data-dependent (a host sync, and untraceable by torch.export).
    The chunk's K/V are written at cache positions lengths + 0..L-1 (slots); its tokens' positions
    (RoPE) are the same, except in a quadratic chunk (row_width W > 0), whose masks repeat
    positions: there the cache positions past lengths + W are the pass's scratch."""

    lengths: torch.Tensor  # [b] committed prefix per row
    tables: torch.Tensor | None  # [b, T] each row's cache blocks (kv_cache.py); None: row i is block i
    is_causal: bool
    positions: torch.Tensor  # [b, L] absolute positions (RoPE): lengths + 0..L-1, or + quadratic_offsets
    length_range: tuple[int, int] | None = None  # (min, max) of lengths, when the caller knows them
    kernels: bool | None = None  # run the Triton kernel (None: ops.use_kernels decides)
    row_width: int = 0  # a quadratic chunk's W (its visibility: quadratic_visibility); 0: causal or block

    @classmethod
    def build(
        cls,
        lengths: torch.Tensor,
        tables: torch.Tensor | None,
        length: int,
        is_causal: bool,
        length_range: tuple[int, int] | None = None,
        kernels: bool | None = None,
        row_width: int = 0,
    ) -> "ChunkLayout":
        positions = lengths[:, None] + chunk_offsets(length, row_width, lengths.device)
        return cls(lengths, tables, is_causal, positions, length_range, kernels, row_width)

    @cached_property
    def slots(self) -> torch.Tensor:
        """[b, L] the cache positions the chunk's K/V are written at: lengths + 0..L-1."""
        if not self.row_width:
            return self.positions
        return self.lengths[:, None] + torch.arange(self.positions.shape[1], device=self.lengths.device)

    @cached_property
    def _min_max(self) -> tuple[int, int]:
        if self.length_range is not None:
            return self.length_range
        return int(self.lengths.min()), int(self.lengths.max())  # a host sync

    @cached_property
    def block_tables(self) -> torch.Tensor:
        """[b, T] tables, or [[0], [1], ..] (a dense cache whose rows are the batch)."""
        if self.tables is not None:
            return self.tables
        return torch.arange(self.lengths.shape[0], device=self.lengths.device)[:, None]

    @cached_property
    def span(self) -> int:
        """Keys to read: max(lengths) + L."""
        return self._min_max[1] + self.positions.shape[1]

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """[b, 1, L, span] True = visible; None when every key is visible."""
        length, longest = self.positions.shape[1], self.span - self.positions.shape[1]
        device = self.lengths.device
        if self.row_width:
            chunk = quadratic_visibility(self.row_width, device)  # [L, L]
            key = torch.arange(self.span, device=device)[None, :] - self.lengths[:, None]  # [b, span] chunk index
            in_chunk = chunk[:, key.clamp(0, length - 1)].permute(1, 0, 2)  # [b, L, span]
            return ((key < 0)[:, None, :] | (in_chunk & (key < length)[:, None, :]))[:, None]
        # Equal prefixes and a block pass (or a single causal token) see every key: no mask needed.
        if self._min_max[0] == longest and not (self.is_causal and length > 1):
            return None
        offsets = torch.arange(length, device=device)
        visible_end = self.lengths[:, None] + (offsets + 1 if self.is_causal else length)  # [b, L]
        return (torch.arange(self.span, device=device) < visible_end[:, :, None])[:, None]


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: ChunkLayout,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's attention for a chunk of L tokens per sequence.

    q [b, L, H, D]; k, v [b, L, Hkv, D]; k_cache, v_cache [N, Hkv, P, D] (this layer's blocks of P
    positions), in q's dtype or float8_e4m3fn codes with 0-d fp32 k_scale / v_scale (value = code * scale).
    Row i's position p is block layout.block_tables[i, p // P], offset p % P (kv_cache.py).
    Writes the chunk's K/V at lengths .. lengths+L-1 (a block pass's K/V stays scratch: the
    caller does not advance lengths, and the next causal pass over those positions overwrites it).
    Query i sees the prefix and chunk keys 0..i (causal), the whole chunk (block), or those of
    quadratic_visibility (a quadratic chunk: its K/V past the verify chain stay scratch too). -> [b, L, H, D]
    """
    span, tables = layout.span, layout.block_tables
    index = position_index(tables, layout.slots, k_cache.shape[2])
    k_cache[index] = store_cached(k, k_cache.dtype, k_scale)
    v_cache[index] = store_cached(v, v_cache.dtype, v_scale)
    if layout.tables is None:  # a dense cache whose rows are the batch: views, no gather
        keys, values = k_cache[:, :, :span], v_cache[:, :, :span]
    else:
        keys, values = gather_blocks(k_cache, tables, span), gather_blocks(v_cache, tables, span)
    keys, values = load_cached(keys, q.dtype, k_scale), load_cached(values, q.dtype, v_scale)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=layout.mask, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor, span: int) -> torch.Tensor:
    """cache [N, Hkv, P, D] -> [b, Hkv, span, D]: positions 0..span-1 of each row's blocks."""
    return cache[span_index(tables, torch.arange(span, device=tables.device), cache.shape[1], cache.shape[2])]


def store_cached(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    if dtype != torch.float8_e4m3fn:
        return x
    assert scale is not None  # a float8 cache always has its scale
    return quantize_e4m3(x, scale)


def load_cached(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    if x.dtype != torch.float8_e4m3fn:
        return x
    assert scale is not None  # a float8 cache always has its scale
    return (x.float() * scale).to(dtype)


# --- sampling ------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a constant a and int64 b in [0, 2^32), without overflow."""
    a_hi, a_lo, b_hi, b_lo = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    return hh + (lh >> 16) + (hl >> 16) + (mid >> 16), ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)


def philox_uniform(seed: torch.Tensor, numel: int) -> torch.Tensor:
    """seed [...] int64 -> [..., numel] fp32 uniforms in [0, 1): along the last dimension
    `tl.rand(seed, offset)` for offset = 0 .. numel-1 (int32 offsets). The key words are the low and
    high 32 bits of the seed's two's complement, as `tl.rand` takes them."""
    assert seed.dtype == torch.int64 and numel < 2**31
    c0 = torch.arange(numel, dtype=torch.int64, device=seed.device)
    c1 = c2 = c3 = torch.zeros_like(c0)
    k0, k1 = (seed & _MASK32)[..., None], ((seed >> 32) & _MASK32)[..., None]
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _MASK32, (k1 + _PHILOX_KEY[1]) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.float() * 4.6566127342e-10


def gumbel_noise(seed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """fp32 Gumbel(0, 1) noise -log(-log u) over logits [b, ..., V]: row r keyed by seed[r] [b],
    indexed by the flat position inside its own [..., V] slice."""
    u = philox_uniform(seed, shape[1:].numel()).view(shape)
    return -torch.log(-torch.log(u))


def sampling_rows(
    temperature: torch.Tensor | float, seed: torch.Tensor | int, num_rows: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row sampling parameters as tensors: temperature [b] float32, seed [b] int64 on device.

    A Python float / int (the decoders' transition form) means that value for every row. A row
    samples when its temperature is > 0 and is greedy otherwise; seeds are Philox keys in
    0..2**63-1 (checked for Python ints; a tensor's values are not read, so no host sync).
    """
    if isinstance(temperature, torch.Tensor):
        if temperature.shape != (num_rows,) or temperature.dtype != torch.float32:
            raise ValueError(
                f"temperature: expected float32 [{num_rows}], got {temperature.dtype} {list(temperature.shape)}"
            )
    else:
        temperature = torch.full((num_rows,), float(temperature), dtype=torch.float32, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.shape != (num_rows,) or seed.dtype != torch.int64:
            raise ValueError(f"seed: expected int64 [{num_rows}], got {seed.dtype} {list(seed.shape)}")
    else:
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed {seed} outside 0..2**63-1")
        seed = torch.full((num_rows,), int(seed), dtype=torch.int64, device=device)
    for name, x in (("temperature", temperature), ("seed", seed)):
        if x.device != torch.device(device):
            raise ValueError(f"{name} is on {x.device}, the logits on {device}")
    return temperature, seed


def pick_tokens(
    logits: torch.Tensor, mask_token_id: int, temperature: torch.Tensor | float = 0.0, seed: torch.Tensor | int = 0
) -> torch.Tensor:
    """Argmax over the vocabulary, first index on ties, mask token excluded (spec §10). Row r with
    temperature[r] > 0 is Gumbel-max: argmax(logits * fp32(1/T_r) + gumbel(seed[r])), in fp32 (a
    product by the fp32 reciprocal of the fp32 temperature, as the kernels compute it).
    logits [b, ..., V], temperature [b] float32, seed [b] int64 (or one float / int for all) -> [b, ...]"""
    assert logits.dim() >= 2, "logits [b, ..., V]: the first dimension is the row (sequence)"
    temperature, seed = sampling_rows(temperature, seed, logits.shape[0], logits.device)
    scores = logits.to(torch.float32, copy=True)  # a copy: never write into the caller's logits
    is_sampled = temperature > 0
    if is_sampled.any():  # only sampled rows pay for the noise
        rows = is_sampled.nonzero()[:, 0]
        sampled = scores[rows]
        inv_temperature = (1.0 / temperature[rows]).view(-1, *[1] * (logits.dim() - 1))
        scores[rows] = sampled * inv_temperature + gumbel_noise(seed[rows], sampled.shape)
    return _masked_argmax(scores, mask_token_id)


def greedy_tokens(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """pick_tokens with every row at temperature 0, without a host sync: what a compiled pass
    returns next to its logits (builder/program.py). logits [b, ..., V] -> [b, ...]"""
    return _masked_argmax(logits.to(torch.float32, copy=True), mask_token_id)


def _masked_argmax(scores: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    scores[..., mask_token_id] = float("-inf")  # scores: the caller's copy
    return scores.argmax(dim=-1)


class Accepted(NamedTuple):
    tokens: torch.Tensor  # [b, L] a_0 .. a_(L-1); emit tokens[:, :n]
    n: torch.Tensor  # [b] accepted length, 1..L
    next_seed: torch.Tensor  # [b] a_(n-1): the next cycle's seed token
    is_eos: torch.Tensor  # [b] an EOS among the emitted a_0 .. a_(n-1)


def spec_accept(
    verify_logits: torch.Tensor,
    draft: torch.Tensor,
    mask_token_id: int,
    eos_ids: torch.Tensor,
    temperature: torch.Tensor | float = 0.0,
    seed: torch.Tensor | int = 0,
) -> Accepted:
    """verify_logits [b, L, V] (causal, index i predicts position i+1), draft [b, L] = [s, d1..d(L-1)],
    eos_ids [E] int64 (may be empty), temperature [b] float32, seed [b] int64 (see pick_tokens).

    a_i = pick(verify logits at i). Accept n = (leading i in 0..L-2 with a_i == d(i+1)) + 1:
    the n-1 matched drafts and one bonus token a_(n-1), which is the next seed.
    """
    return accept_picks(pick_tokens(verify_logits, mask_token_id, temperature, seed), draft, eos_ids)


def accept_picks(a: torch.Tensor, draft: torch.Tensor, eos_ids: torch.Tensor) -> Accepted:
    """spec_accept's rule on the verify picks a [b, L] (a_i = pick(verify logits at i))."""
    matches = (a[:, :-1] == draft[:, 1:]).long()
    n = matches.cumprod(dim=1).sum(dim=1) + 1
    emitted = torch.arange(a.shape[1], device=a.device) < n[:, None]
    is_eos = (torch.isin(a, eos_ids) & emitted).any(dim=1)
    return Accepted(a, n, a.gather(1, (n - 1)[:, None])[:, 0], is_eos)


def diffusion_commit(
    logits: torch.Tensor,
    block: torch.Tensor,
    mask_token_id: int,
    threshold: float | None,
    num_commit: torch.Tensor | None,
    temperature: torch.Tensor | float = 0.0,
    seed: torch.Tensor | int = 0,
) -> torch.Tensor:
    """One denoising step. logits [b, L, V] (block pattern: index i predicts position i), block [b, L],
    temperature [b] float32, seed [b] int64 (see pick_tokens).

    Candidates x0 = pick(logits); confidence = softmax(logits)[x0] (fp32, untempered) at masked
    positions. With a threshold: commit the most confident masked position always (first on ties),
    and every masked position with confidence >= threshold. Without: commit the num_commit [b]
    most confident. -> the new block [b, L].
    """
    x0 = pick_tokens(logits, mask_token_id, temperature, seed)
    return commit_picks(x0, pick_confidence(logits, x0), block, mask_token_id, threshold, num_commit)


def pick_confidence(logits: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[picks] in fp32, untempered. logits [b, L, V], picks [b, L] -> [b, L]"""
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.gather(-1, picks[..., None])[..., 0]


def commit_picks(
    x0: torch.Tensor,
    confidence: torch.Tensor,
    block: torch.Tensor,
    mask_token_id: int,
    threshold: float | None,
    num_commit: torch.Tensor | None,
) -> torch.Tensor:
    """diffusion_commit's rule on the candidates x0 [b, L] and their confidences [b, L]."""
    is_masked = block == mask_token_id
    confidence = torch.where(is_masked, confidence, torch.tensor(float("-inf"), device=block.device))
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)  # 0 = most confident
    if threshold is not None:
        commit = (rank == 0) | (confidence >= threshold)
    else:
        assert num_commit is not None
        commit = rank < num_commit[:, None]
    commit &= is_masked
    return torch.where(commit, x0, block)
