"""The three hot-path ops as ONNX custom-domain nodes, and their onnxruntime implementations.

While `torch.onnx.export(..., dynamo=True)` traces the model, ops.py routes each op here and it
becomes one node in domain "trimode", version 1:

  BlockAttention  (q, k, v, k_cache [N, Hkv, P, D], v_cache, lengths [b] i64, tables [b, T] i64,
                   k_scale, v_scale)
                  -> (out, k_cache_out, v_cache_out)        attrs: is_causal, row_width
                  (row_width W > 0: a quadratic chunk, reference.quadratic_visibility; 0 otherwise)
                  (the caches are blocks of P positions; row i's position p is block
                   tables[i, p // P], offset p % P: kv_cache.py)
  SpecAccept      (verify_logits [b, L, V], draft [b, L] i64, eos_ids [E] i64, temperature [b] f32,
                   seed [b] i64, counters [b] i32)
                  -> (tokens [b, L] i64, n [b] i64, next_seed [b] i64, is_eos [b] bool)
                                                                              attrs: mask_token_id
  DiffusionCommit (logits [b, L, V], block [b, L] i64, num_commit [b] i64, temperature [b] f32,
                   seed [b] i64, counters [b] i32)
                  -> (new block [b, L] i64, confidence [b, L] f32)
                                                     attrs: mask_token_id, threshold, use_threshold
(temperature, seed: per sequence, runtime inputs, so one graph serves every sampling setting; a
Python float / int from the caller becomes a [b] tensor made in the graph. counters: zeros made
in the graph, the kernels' per-sequence scratch; see tensorrt.py.)

Every node also carries what TensorRT's ONNX parser needs to map it to the plugin of the same name
(TENSORRT_ATTRS): plugin_namespace, plugin_version and aot=1 (the ahead-of-time plugin).
The shapes and the math are reference.py's; onnxruntime runs the nodes with those references
(register_onnxruntime_ops), so the exported graph is checked on CPU against the torch runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from trimode.errors import MissingDependencyError
from trimode.plugins import reference
from trimode.plugins.reference import Accepted, ChunkLayout, sampling_rows

if TYPE_CHECKING:
    import onnxruntime

DOMAIN = "trimode"
VERSION = 1
OP_TYPES = ("BlockAttention", "SpecAccept", "DiffusionCommit")
TENSORRT_ATTRS: dict[str, int | str] = {"plugin_namespace": DOMAIN, "plugin_version": str(VERSION), "aot": 1}


def _node(
    op_type: str, inputs: list[torch.Tensor], attrs: dict, dtypes: list[torch.dtype], shapes: list
) -> list[torch.Tensor]:
    return list(
        torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::{op_type}", inputs, {**attrs, **TENSORRT_ATTRS}, dtypes=dtypes, shapes=shapes, version=VERSION
        )
    )


# --- node emitters (called from ops.py during export) -----------------------------------------------


def block_attention_node(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: ChunkLayout,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One BlockAttention node; reads only layout.lengths, layout.block_tables, layout.is_causal and
    layout.row_width (an attribute on every node, 0 included: TensorRT's plugin takes it always).

    ONNX is functional: the node returns the caches with the chunk's K/V written as two more
    outputs. Writing them back with copy_ keeps the reference's in-place contract; torch.export
    turns that write into an input mutation, which torch.onnx (2.13) leaves out of the graph's
    outputs: the exported module must return the cache tensors for the update to be a graph output.
    Scales are always inputs (1.0 when the cache is not FP8, where they are ignored): onnxruntime's
    custom ops and TensorRT's plugin signatures take a fixed number of inputs.
    """
    one = torch.ones((), dtype=torch.float32, device=q.device)
    inputs = [
        q,
        k,
        v,
        k_cache,
        v_cache,
        layout.lengths.long(),
        layout.block_tables.long(),
        one if k_scale is None else k_scale.float(),
        one if v_scale is None else v_scale.float(),
    ]
    out, k_cache_out, v_cache_out = _node(
        "BlockAttention",
        inputs,
        {"is_causal": int(layout.is_causal), "row_width": int(layout.row_width)},
        dtypes=[q.dtype, k_cache.dtype, v_cache.dtype],
        shapes=[q.shape, k_cache.shape, v_cache.shape],
    )
    k_cache.copy_(k_cache_out)
    v_cache.copy_(v_cache_out)
    return out


def spec_accept_node(
    verify_logits: torch.Tensor,
    draft: torch.Tensor,
    mask_token_id: int,
    eos_ids: torch.Tensor,
    temperature: torch.Tensor | float = 0.0,
    seed: torch.Tensor | int = 0,
) -> Accepted:
    """One SpecAccept node (see reference.spec_accept)."""
    b = draft.shape[0]
    temperature, seed = sampling_rows(temperature, seed, b, draft.device)
    inputs = [verify_logits, draft.long(), eos_ids.long(), temperature, seed, _counters(b, draft.device)]
    tokens, n, next_seed, is_eos = _node(
        "SpecAccept",
        inputs,
        {"mask_token_id": int(mask_token_id)},
        dtypes=[torch.int64, torch.int64, torch.int64, torch.bool],
        shapes=[draft.shape, [b], [b], [b]],
    )
    return Accepted(tokens, n, next_seed, is_eos)


def diffusion_commit_node(
    logits: torch.Tensor,
    block: torch.Tensor,
    mask_token_id: int,
    threshold: float | None,
    num_commit: torch.Tensor | None,
    temperature: torch.Tensor | float = 0.0,
    seed: torch.Tensor | int = 0,
) -> torch.Tensor:
    """One DiffusionCommit node (see reference.diffusion_commit); num_commit is zeros when the
    threshold rule is on (use_threshold=1), and threshold 0.0 when it is off."""
    assert threshold is not None or num_commit is not None
    if num_commit is None:
        num_commit = torch.zeros_like(block[:, 0], dtype=torch.int64)
    temperature, seed = sampling_rows(temperature, seed, block.shape[0], block.device)
    attrs = {
        "mask_token_id": int(mask_token_id),
        "threshold": float(threshold or 0.0),
        "use_threshold": int(threshold is not None),
    }
    inputs = [logits, block.long(), num_commit.long(), temperature, seed, _counters(block.shape[0], block.device)]
    new_block, _confidence = _node(
        "DiffusionCommit", inputs, attrs, dtypes=[torch.int64, torch.float32], shapes=[block.shape, block.shape]
    )
    return new_block


def _counters(num_sequences: int, device: torch.device) -> torch.Tensor:
    """The kernels' per-sequence counters (zeros), made in the graph on every call, so a TensorRT
    engine needs no persistent state for them; the onnxruntime implementations ignore them."""
    return torch.zeros(num_sequences, dtype=torch.int32, device=device)


# --- onnxruntime: the references behind the nodes ---------------------------------------------------


def _run_block_attention(
    q, k, v, k_cache, v_cache, lengths, tables, k_scale, v_scale, *, is_causal: int, row_width: int
):
    q, k, v, lengths, tables, k_scale, v_scale = (
        torch.from_numpy(x) for x in (q, k, v, lengths, tables, k_scale, v_scale)
    )
    k_cache, v_cache = torch.from_numpy(k_cache.copy()), torch.from_numpy(v_cache.copy())  # new outputs
    layout = ChunkLayout.build(lengths, tables, q.shape[1], bool(is_causal), row_width=row_width)
    out = reference.block_attention(q, k, v, k_cache, v_cache, layout, k_scale, v_scale)  # writes the caches
    return out.numpy(), k_cache.numpy(), v_cache.numpy()


def _run_spec_accept(verify_logits, draft, eos_ids, temperature, seed, counters, *, mask_token_id: int):
    accepted = reference.spec_accept(
        torch.from_numpy(verify_logits),
        torch.from_numpy(draft),
        mask_token_id,
        torch.from_numpy(eos_ids),
        torch.from_numpy(temperature),
        torch.from_numpy(seed),
    )
    return tuple(x.numpy() for x in accepted)


def _run_diffusion_commit(
    logits, block, num_commit, temperature, seed, counters, *, mask_token_id: int, threshold: float, use_threshold: int
):
    logits, block = torch.from_numpy(logits), torch.from_numpy(block)
    temperature, seed = torch.from_numpy(temperature), torch.from_numpy(seed)
    new_block = reference.diffusion_commit(
        logits,
        block,
        mask_token_id,
        threshold if use_threshold else None,
        torch.from_numpy(num_commit),
        temperature,
        seed,
    )
    # the confidences the kernel also returns: softmax(logits)[x0] where the block was masked
    x0 = reference.pick_tokens(logits, mask_token_id, temperature, seed)
    confidence = torch.softmax(logits.float(), -1).gather(-1, x0[..., None])[..., 0]
    confidence = torch.where(block == mask_token_id, confidence, float("-inf"))
    return new_block.numpy(), confidence.numpy()


_registered = False


def register_onnxruntime_ops() -> None:
    """Register the three implementations with onnxruntime-extensions (once per process).

    A Python custom op has fixed input/output types, so these run float32 graphs (the CPU check);
    bfloat16 and float8 tensors have no numpy type and cannot reach a Python op.
    """
    global _registered
    if _registered:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as err:
        raise MissingDependencyError("onnxruntime-extensions", "onnx") from err
    f32, i64, boolean = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_bool
    onnx_op(
        op_type=f"{DOMAIN}::BlockAttention",
        inputs=[f32] * 5 + [i64, i64, f32, f32],
        outputs=[f32, f32, f32],
        attrs={"is_causal": i64, "row_width": i64},
    )(_run_block_attention)
    i32 = PyCustomOpDef.dt_int32
    onnx_op(
        op_type=f"{DOMAIN}::SpecAccept",
        inputs=[f32, i64, i64, f32, i64, i32],
        outputs=[i64, i64, i64, boolean],
        attrs={"mask_token_id": i64},
    )(_run_spec_accept)
    onnx_op(
        op_type=f"{DOMAIN}::DiffusionCommit",
        inputs=[f32, i64, i64, f32, i64, i32],
        outputs=[i64, f32],
        attrs={"mask_token_id": i64, "threshold": f32, "use_threshold": i64},
    )(_run_diffusion_commit)
    _registered = True


def session_options() -> "onnxruntime.SessionOptions":
    """onnxruntime session options that can run graphs holding trimode nodes."""
    try:
        import onnxruntime
        from onnxruntime_extensions import get_library_path
    except ImportError as err:
        raise MissingDependencyError("onnxruntime and onnxruntime-extensions", "onnx") from err
    register_onnxruntime_ops()
    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options
