"""One pass kind as a traceable program: what `torch.export` (and so AOTInductor) compiles.

The eager model stays the oracle; this wraps it with an attention torch.export can trace
(../shared/notes/stack.md, "Compiling the forward"): no host sync, no data-dependent Python, and
the KV pool passed in as one K and one V tensor per layer, written in place.

Inputs of every program, in order (all on the model's device):
  tokens      [b, L] int64     the chunk
  lengths     [b] int64        the rows' committed lengths (the pool's `lengths` of the batch's slots)
  tables      [b, T] int64     the rows' block tables (kv_cache.py; T = ceil(max_seq_len / P) static)
  key_index   [S] int64        0..S-1: the keys attention reads, S = max(lengths) + L rounded up
                               (its shape is the program's dynamic span; runner.span_bucket)
  logit_index [b] int64        the chunk index whose logit a last-logit kind returns
  causal      [] bool          a block program's attention pattern: True for a verify pass
                               (prefill, decode and quadratic programs ignore it)
  k_0..k_(n-1), v_0..v_(n-1)   the pool [num_blocks + 1, Hkv, P, D] per layer (P = the block size)
-> (logits [b, L, V] fp32, or [b, 1, V] for prefill / refresh; picks [b, L or 1] the greedy tokens;
    is_finite [] bool; and for a block program confidence [b, L]): decoding/runner.PassOutput's
fields, computed here so a greedy batch needs no tensor work on the logits after the pass.
One block program per block length serves the three block-sized passes: denoise (causal False),
verify (causal True) and draft (causal False, loaded over the draft twins' tensors: torch_backend).
A quadratic program (PassKind.QUADRATIC, ../shared/spec/quadratic.md) per block length W runs a
static chunk of W(W+1) tokens: the verify chain on the base GEMMs, the W mask rows on the draft
twins (gemms.py), its pattern from indices (quadratic_bounds), its RoPE positions repeating.
Row i's position p is block tables[i, p // P], offset p % P: the chunk is written there and the keys
are read from there with one gather, so a program never reads host state.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from trimode.builder.gemms import ProgramGemms
from trimode.errors import EngineError
from trimode.kv_cache import position_index, span_index
from trimode.model import NLDModel
from trimode.passes import PassKind, Pattern, quadratic_chunk, quadratic_width
from trimode.plugins.reference import chunk_offsets, greedy_tokens, load_cached, pick_confidence, store_cached
from trimode.rope import llama4_query_scale, rope_cos_sin


def quadratic_bounds(width: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """reference.quadratic_visibility as bounds per query, chunk indices past the prefix ([C] each,
    C = W(W+1)): query q sees chunk keys < chain_end[q] (the verify chain's t_0 .. t_i) and those in
    [row_start[q], row_end[q]) (its own row of masks; empty for the chain). Bounds, not a [C, C]
    table: the mask is then compares on the keys' indices, as the kernel computes it."""
    chunk = torch.arange(quadratic_chunk(width), device=device)
    row = (chunk - width).div(width, rounding_mode="floor")  # the query's mask row; < 0: the chain
    is_mask = chunk >= width
    chain_end = torch.where(is_mask, row + 1, chunk + 1)
    row_start = torch.where(is_mask, width * (row + 1), 0)
    return chain_end, row_start, torch.where(is_mask, row_start + width, 0)


def pool_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    key_index: torch.Tensor,
    is_causal: bool | torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    row_width: int = 0,
) -> torch.Tensor:
    """reference.block_attention's math over the first S keys of each row's blocks, with a mask built
    from lengths (every shape static or symbolic). q [b, L, H, D]; k, v [b, L, Hkv, D];
    k_pool, v_pool [N, Hkv, P, D]; tables [b, T] -> [b, L, H, D].
    is_causal: a bool, or a [] bool tensor (the block program's input); row_width W > 0: a quadratic
    chunk (L = W(W+1)), its pattern quadratic_bounds' whatever is_causal says."""
    L, page = q.shape[1], k_pool.shape[2]
    offsets = torch.arange(L, device=q.device)
    # the chunk is written at lengths + 0..L-1, also a quadratic one (past its chain: scratch)
    chunk = position_index(tables, lengths[:, None] + offsets, page)
    k_pool[chunk] = store_cached(k, k_pool.dtype, k_scale)
    v_pool[chunk] = store_cached(v, v_pool.dtype, v_scale)
    # one gather of [b, Hkv, S, D]: a slice [:S] of the pool would guard on S (contiguity) in export
    index = span_index(tables, key_index, k_pool.shape[1], page)
    keys, values = load_cached(k_pool[index], q.dtype, k_scale), load_cached(v_pool[index], q.dtype, v_scale)
    key = key_index[None, None, :]
    if row_width:
        chain_end, row_start, row_end = (lengths[:, None] + bound for bound in quadratic_bounds(row_width, q.device))
        in_row = (key >= row_start[:, :, None]) & (key < row_end[:, :, None])
        mask = ((key < chain_end[:, :, None]) | in_row)[:, None]  # [b, 1, L, S]
    else:
        if isinstance(is_causal, torch.Tensor):
            visible_end = lengths[:, None] + torch.where(is_causal, offsets + 1, L)  # [b, L]
        else:
            visible_end = lengths[:, None] + (offsets + 1 if is_causal else L)
        mask = (key < visible_end[:, :, None])[:, None]  # [b, 1, L, S]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)


class PassProgram(nn.Module):
    """The forward of one program over the pool (see the module docstring for the inputs): the
    eager model's layers, its GEMMs fused and pre-transposed (gemms.py). kind: the program's
    PassShape kind (PREFILL, DECODE, DENOISE for a block program, or QUADRATIC)."""

    def __init__(self, model: NLDModel, kind: PassKind, gemms: ProgramGemms | None = None):
        super().__init__()
        self.model, self.kind = model, kind
        self.gemms = gemms or ProgramGemms(model)

    def forward(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        tables: torch.Tensor,
        key_index: torch.Tensor,
        logit_index: torch.Tensor,
        causal: torch.Tensor,
        *pool: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        is_block = self.kind.pattern == Pattern.BLOCK
        # a block program's pattern is its input; the others' is fixed (a quadratic one's: row_width)
        logits = self.logits(tokens, lengths, tables, key_index, logit_index, causal if is_block else True, pool)
        picks = greedy_tokens(logits, self.model.spec.mask_token_id)
        out = (logits, picks, torch.isfinite(logits).all())
        return out + (pick_confidence(logits, picks),) if is_block else out

    def logits(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        tables: torch.Tensor,
        key_index: torch.Tensor,
        logit_index: torch.Tensor,
        is_causal: bool | torch.Tensor,
        pool: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        model, num_layers = self.model, len(pool) // 2
        L = tokens.shape[1]
        use_draft = self.kind.draft_rows(L)  # a quadratic program: the draft twins for its mask rows
        row_width = self.kind.row_width(L)
        positions = lengths[:, None] + chunk_offsets(L, row_width, tokens.device)
        cos, sin = rope_cos_sin(positions, model.inv_freq, model.rope_attn_scale, model.dtype)
        q_scale = llama4_query_scale(positions, model.spec.rope)
        h = model.encoder.embed_tokens(tokens)
        for i, (layer, gemms) in enumerate(zip(model.encoder.layers, self.gemms.layers)):
            attn = layer.self_attn
            q, k, v = gemms.run("qkv", layer.input_layernorm(h), use_draft)
            q, k, v = attn.heads(q, k, v, cos, sin, q_scale)
            out = pool_attention(
                q,
                k,
                v,
                pool[i],
                pool[num_layers + i],
                tables,
                lengths,
                key_index,
                is_causal,
                attn.k_scale,
                attn.v_scale,
                row_width,
            )
            h = h + gemms.run("o", out.flatten(2), use_draft)[0]
            gate, up = gemms.run("gate_up", layer.post_attention_layernorm(h), use_draft)
            h = h + gemms.run("down", F.silu(gate) * up, use_draft)[0]
        if self.kind.last_logit_only:
            h = h[torch.arange(h.shape[0], device=h.device), logit_index][:, None]
        return self.gemms.head(model.encoder.norm(h))[0].float()


@dataclass(frozen=True)
class PassShape:
    """One compiled program: a pass kind at a chunk length (None: dynamic, 1..max_input_len, prefill),
    or for a quadratic program at a block length (its chunk: W(W+1) tokens)."""

    kind: PassKind
    length: int | None

    @property
    def name(self) -> str:
        return f"{self.kind.value}_{self.length or 'n'}"

    @property
    def chunk(self) -> int | None:
        """Tokens per row of the program's input (None: dynamic)."""
        return quadratic_chunk(self.length) if self.kind == PassKind.QUADRATIC and self.length else self.length


def pass_shapes(block_lengths: tuple[int, ...], max_seq_len: int) -> list[PassShape]:
    """The programs the decoders call: a prompt chunk (which also serves refresh), an AR token, and
    per block length the diffusion denoise, the self-spec draft and verify passes (the torch backend
    compiles one block program for the three) and the quadratic pass, where its chunk fits below
    max_seq_len (a longer one could never run: the engine refuses such a request when it is added)."""
    shapes = [PassShape(PassKind.PREFILL, None), PassShape(PassKind.DECODE, 1)]
    for L in sorted(set(block_lengths)):
        shapes += [PassShape(kind, L) for kind in (PassKind.DENOISE, PassKind.DRAFT, PassKind.VERIFY)]
        if quadratic_chunk(L) < max_seq_len:
            shapes.append(PassShape(PassKind.QUADRATIC, L))
    return shapes


_Program = TypeVar("_Program")


def lookup(
    programs: dict[str, _Program], kind: PassKind, length: int, max_input_len: int
) -> tuple[PassShape, _Program]:
    """The program of `programs` (by shape name) that runs this pass, or one line saying what to rebuild."""
    shape = program_for(kind, length)
    if shape.name not in programs:
        raise EngineError(f"this engine has no {shape.name} program: rebuild it with --block-lengths {shape.length}")
    if shape.length is None and length > max_input_len:
        raise EngineError(f"a {length}-token chunk is longer than this engine's max_input_len {max_input_len}")
    return shape, programs[shape.name]


def program_for(kind: PassKind, length: int) -> PassShape:
    """The program that runs a pass of `length` tokens. A refresh is a prefill over the finished block:
    both are causal and need only the last logit, so one dynamic-length program serves both. A
    quadratic program is named by its block length W (its chunk: W(W+1) tokens)."""
    if kind in (PassKind.PREFILL, PassKind.REFRESH):
        return PassShape(PassKind.PREFILL, None)
    if kind == PassKind.QUADRATIC:
        return PassShape(kind, quadratic_width(length))
    return PassShape(kind, length)


@contextlib.contextmanager
def quiet_export():
    """Silence what torch.export and the ONNX exporter print per program and a user can do nothing
    about (torch 2.13's pytree deprecation, the ONNX exporter's notes on dynamic-axis names, skipped
    torchvision ops and empty attributes): noise on a build's stderr. Errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*dynamic axes will not be renamed.*", category=UserWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
