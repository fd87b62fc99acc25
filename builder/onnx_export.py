"""The two ONNX graphs of a pass shape, exported from the eager model (onnx_backend.py says why two):

- the native graph (`export_native_pass`, `NativePass`): standard ONNX operators only, the pool read in
  place and only the chunk's K/V returned; what the onnx backend runs;
- the plugin graph (`export_pass`, `ExportedPass`): the eager forward with one `trimode::BlockAttention`
  node per layer (plugins/onnx_ops.py), the pool in and out; what TensorRT consumes
  (tensorrt_backend.py), checked on CPU by onnx_backend.PluginGraphBackend.

`graph_model` gives the model both export: fp32 weights, FP8 linears as standard Q/DQ nodes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trimode.builder.program import PassShape, quadratic_bounds, quiet_export
from trimode.builder.settings import BuildSettings
from trimode.fp8 import E4M3, FP8Linear
from trimode.kv_cache import KVCache, span_index
from trimode.model import NLDModel
from trimode.passes import PassKind, Pattern, quadratic_width
from trimode.plugins.reference import chunk_offsets

GRAPH_DTYPE = torch.float32


class ExportedPass(nn.Module):
    """NLDModel.forward for one pass kind over the pool, with the graph's inputs and outputs."""

    def __init__(self, model: NLDModel, kind: PassKind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, tokens, tables, lengths, logit_index, k: list[torch.Tensor], v: list[torch.Tensor]):
        # the batch's own lengths and tables as a pool whose slots are the batch (rows None: every slot)
        logits = self.model(tokens, KVCache(k, v, lengths, tables), self.kind, None, logit_index)
        return (logits, *k, *v)  # the caches written in place: returning them makes the update an output


class NativePass(nn.Module):
    """The eager model's layers for one pass kind with attention in standard ONNX operators: the
    native graph (module docstring). Returns the logits and each layer's chunk K/V [b, L, Hkv, D]
    (what the eager model writes into the cache); the backend writes them into the pool."""

    def __init__(self, model: NLDModel, kind: PassKind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, tokens, tables, lengths, key_index, logit_index, k: list[torch.Tensor], v: list[torch.Tensor]):
        model, L = self.model, tokens.shape[1]
        use_draft = self.kind.draft_rows(L)  # a quadratic pass: the adapter on its mask rows only
        own = chunk_visibility(self.kind.pattern, L)
        positions = lengths[:, None] + chunk_offsets(L, self.kind.row_width(L))  # a quadratic chunk's repeat
        new_k, new_v = [], []

        def attend(i: int, attn, x, cos, sin, q_scale):
            q, chunk_k, chunk_v = attn.project(x, cos, sin, q_scale, use_draft)
            new_k.append(chunk_k)
            new_v.append(chunk_v)
            out = native_attention(q, chunk_k, chunk_v, k[i], v[i], tables, lengths, key_index, own)
            return attn.output(out, use_draft)

        h = model._layers(tokens, positions, attend, use_draft)
        if logit_index is not None:
            h = h[torch.arange(h.shape[0]), logit_index][:, None]
        return (model.diffusion_head(model.encoder.norm(h)).float(), *new_k, *new_v)


def chunk_visibility(pattern: Pattern, length: int) -> torch.Tensor:
    """[L, L] bool: which chunk keys a chunk query sees (besides the prefix), from indices: causal,
    block (all), or a quadratic chunk's (program.quadratic_bounds)."""
    chunk = torch.arange(length)
    if pattern == Pattern.QUADRATIC:
        chain_end, row_start, row_end = (bound[:, None] for bound in quadratic_bounds(quadratic_width(length)))
        return (chunk < chain_end) | ((chunk >= row_start) & (chunk < row_end))
    if pattern == Pattern.CAUSAL:
        return chunk[None, :] <= chunk[:, None]
    return torch.ones(length, length, dtype=torch.bool)


def native_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    key_index: torch.Tensor,
    own: torch.Tensor,
) -> torch.Tensor:
    """reference.block_attention's math without writing the pool: the rows' cached keys 0..S-1
    (key_index: block tables[:, j // P], offset j % P, one gather) then the chunk's own, visible as
    own [L, L] says (chunk_visibility), the prefix's from lengths. q [b, L, H, D]; k, v [b, L, Hkv, D];
    k_pool, v_pool [N, Hkv, P, D] fp32; tables [b, T] -> [b, L, H, D]"""
    b, L, H, D = q.shape
    Hkv = k.shape[2]
    index = span_index(tables, key_index, Hkv, k_pool.shape[2])
    keys = torch.cat([k_pool[index], k.transpose(1, 2)], dim=2)[:, :, None]  # [b, Hkv, 1, S + L, D]
    values = torch.cat([v_pool[index], v.transpose(1, 2)], dim=2)[:, :, None]
    cached = (key_index[None, :] < lengths[:, None])[:, None, :].expand(b, L, key_index.shape[0])
    mask = torch.cat([cached, own[None].expand(b, L, L)], dim=2)[:, None, None]  # [b, 1, 1, L, S + L]
    queries = q.transpose(1, 2).reshape(b, Hkv, H // Hkv, L, D)  # head h reads kv head h // (H / Hkv)
    scores = (queries @ keys.transpose(-1, -2)) * D**-0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ values).reshape(b, H, L, D).transpose(1, 2)


def graph_names(num_layers: int, has_logit_index: bool) -> tuple[list[str], list[str]]:
    inputs = ["tokens", "tables", "lengths"] + (["logit_index"] if has_logit_index else [])
    pool = [f"k_{i}" for i in range(num_layers)] + [f"v_{i}" for i in range(num_layers)]
    return inputs + pool, ["logits"] + [name.replace("_", "_out_") for name in pool]


def export_pass(
    model: NLDModel, shape: PassShape, settings: BuildSettings, path: Path, pool_dtype: torch.dtype = GRAPH_DTYPE
) -> None:
    """Export one program of `model` (see graph_model) to `path`, the pool inputs in pool_dtype."""
    spec, B = model.spec, settings.max_batch_size
    # torch.export specialises dims of size 1: trace with 2 and allow the range the engine serves
    batch = torch.export.Dim("batch", min=1, max=max(2, B))
    L = shape.chunk or 2
    has_logit_index = shape.kind.last_logit_only
    cache = settings.new_pool(spec, pool_dtype)
    b = min(2, B)
    token = spec.bos_token_id if spec.bos_token_id is not None else spec.mask_token_id  # any id traces
    args = (
        torch.full((b, L), token),
        cache.block_tables[:b].clone(),
        torch.zeros(b, dtype=torch.long),
        torch.full((b,), L - 1) if has_logit_index else None,
        list(cache.k),
        list(cache.v),
    )
    length = torch.export.Dim("length", min=1, max=max(2, settings.max_input_len)) if shape.length is None else None
    dynamic = {
        "tokens": {0: batch, 1: length} if length else {0: batch},
        "tables": {0: batch},
        "lengths": {0: batch},
        "logit_index": {0: batch} if has_logit_index else None,
        "k": [None] * len(cache.k),
        "v": [None] * len(cache.v),
    }
    _export(ExportedPass(model, shape.kind), args, dynamic, graph_names(spec.num_hidden_layers, has_logit_index), path)


def native_names(num_layers: int, has_logit_index: bool) -> tuple[list[str], list[str]]:
    inputs = ["tokens", "tables", "lengths", "key_index"] + (["logit_index"] if has_logit_index else [])
    pool = [f"k_{i}" for i in range(num_layers)] + [f"v_{i}" for i in range(num_layers)]
    return inputs + pool, ["logits"] + [name.replace("_", "_new_") for name in pool]


def export_native_pass(model: NLDModel, shape: PassShape, settings: BuildSettings, path: Path) -> None:
    """Export the native graph of one program of `model` (see graph_model) to `path`."""
    spec, B, S = model.spec, settings.max_batch_size, settings.max_seq_len
    batch = torch.export.Dim("batch", min=1, max=max(2, B))  # traced with 2: export specialises 1
    span = torch.export.Dim("span", min=1, max=max(3, S))
    L = shape.chunk or 2
    has_logit_index = shape.kind.last_logit_only
    cache = settings.new_pool(spec, GRAPH_DTYPE)
    token = spec.bos_token_id if spec.bos_token_id is not None else spec.mask_token_id  # any id traces
    args = (
        torch.full((2, L), token),
        cache.block_tables[torch.arange(2) % B].clone(),
        torch.zeros(2, dtype=torch.long),
        torch.arange(3) % S,
        torch.full((2,), L - 1) if has_logit_index else None,
        list(cache.k),
        list(cache.v),
    )
    length = torch.export.Dim("length", min=1, max=max(2, settings.max_input_len)) if shape.length is None else None
    dynamic = {
        "tokens": {0: batch, 1: length} if length else {0: batch},
        "tables": {0: batch},
        "lengths": {0: batch},
        "key_index": {0: span},
        "logit_index": {0: batch} if has_logit_index else None,
        "k": [None] * len(cache.k),
        "v": [None] * len(cache.v),
    }
    _export(NativePass(model, shape.kind), args, dynamic, native_names(spec.num_hidden_layers, has_logit_index), path)


def _export(module: nn.Module, args: tuple, dynamic: dict, names: tuple[list[str], list[str]], path: Path) -> None:
    """torch.onnx.export (dynamo) of module(*args) to path, with these dynamic dims and (input, output) names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_export():
        torch.onnx.export(
            module.eval(),
            args,
            path,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=names[0],
            output_names=names[1],
            verbose=False,
        )


class QdqLinear(nn.Module):
    """An FP8Linear that exports as Q/DQ nodes (its simulate() math: x rounded through E4M3 with
    input_scale, weights = codes * weight_scale, the GEMM in fp32); eager, it is simulate()."""

    def __init__(self, linear: FP8Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return self.linear.simulate(x)
        fc, dtype = self.linear, x.dtype
        zero = torch.zeros((), dtype=E4M3)  # the float8 zero point sets the quantized type
        x = x.float()
        q = torch.onnx.ops.symbolic("QuantizeLinear", [x, fc.input_scale, zero], {}, dtype=E4M3, shape=x.shape)
        x = torch.onnx.ops.symbolic("DequantizeLinear", [q, fc.input_scale], {}, dtype=torch.float32, shape=x.shape)
        w = torch.onnx.ops.symbolic(
            "DequantizeLinear", [fc.weight, fc.weight_scale], {}, dtype=torch.float32, shape=fc.weight.shape
        )
        return F.linear(x, w).to(dtype)


def graph_model(model: NLDModel, dtype: torch.dtype = GRAPH_DTYPE) -> NLDModel:
    """The model to export: its weights in `dtype`, FP8 linears as Q/DQ (a copy, unless nothing
    changes). Buffers keep their dtype, as the loader leaves them: the fp32 RoPE frequencies and
    FP8 scales, the float8 weights."""
    has_fp8 = any(isinstance(m, FP8Linear) for m in model.modules())
    if model.dtype == dtype and not has_fp8:
        return model
    model = copy.deepcopy(model)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    for name, linear in [(name, m) for name, m in model.named_modules() if isinstance(m, FP8Linear)]:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, QdqLinear(linear))
    return model
