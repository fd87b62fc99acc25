"""The one place the runtime calls the three hot-path ops, and where they are registered.

Each op has a pure-torch reference (reference.py, the oracle) and an OpenAI Triton kernel
(block_attention.py, spec_accept.py, diffusion_commit.py). Which one runs:
- TRIMODE_KERNELS=auto (default): the kernels on CUDA tensors, the references on CPU;
- TRIMODE_KERNELS=triton: the kernels everywhere (on CPU only under TRITON_INTERPRET=1, for tests);
- TRIMODE_KERNELS=reference: the references everywhere.
The kernels are reached through torch custom ops (`torch.ops.trimode.*`), so torch.compile and
torch.export see one opaque node each; while exporting to ONNX the ops become custom-domain nodes
(onnx_ops.py) that onnxruntime runs with the references and TensorRT maps to plugins (tensorrt.py).
"""

from __future__ import annotations

import os

import torch

from trimode.errors import ConfigError
from trimode.plugins import reference
from trimode.plugins.reference import Accepted, ChunkLayout, sampling_rows

KERNELS_ENV = "TRIMODE_KERNELS"
CHOICES = ("auto", "triton", "reference")


def use_kernels(device: torch.device) -> bool:
    """The default choice for a device. The engine's ModelRunner asks once, when it is built, and
    passes its answer to every call (`kernels=`); callers that pass None get it per call."""
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in CHOICES:
        raise ConfigError(f"{KERNELS_ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice == "triton" or (choice == "auto" and device.type == "cuda")


# --- torch custom ops: the kernels behind one opaque node each --------------------------------------


@torch.library.custom_op("trimode::block_attention", mutates_args=("k_cache", "v_cache"))
def _block_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    tables: torch.Tensor,
    is_causal: bool,
    row_width: int,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> torch.Tensor:
    from trimode.plugins.block_attention import launch

    return launch(q, k, v, k_cache, v_cache, lengths, tables, is_causal, k_scale, v_scale, row_width=row_width)


@_block_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, lengths, tables, is_causal, row_width, k_scale, v_scale):
    return torch.empty_like(q)


@torch.library.custom_op("trimode::spec_accept", mutates_args=())
def _spec_accept_op(
    verify_logits: torch.Tensor,
    draft: torch.Tensor,
    mask_token_id: int,
    eos_ids: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from trimode.plugins.spec_accept import launch

    tokens, n, next_seed, is_eos = launch(verify_logits, draft, mask_token_id, eos_ids, temperature, seed)
    return tokens, n, next_seed, is_eos


@_spec_accept_op.register_fake
def _(verify_logits, draft, mask_token_id, eos_ids, temperature, seed):
    b = draft.shape[0]
    return (
        torch.empty_like(draft),
        draft.new_empty(b),
        draft.new_empty(b),
        torch.empty(b, dtype=torch.bool, device=draft.device),
    )


@torch.library.custom_op("trimode::diffusion_commit", mutates_args=())
def _diffusion_commit_op(
    logits: torch.Tensor,
    block: torch.Tensor,
    mask_token_id: int,
    threshold: float | None,
    num_commit: torch.Tensor | None,
    temperature: torch.Tensor,
    seed: torch.Tensor,
) -> torch.Tensor:
    from trimode.plugins.diffusion_commit import launch

    return launch(logits, block, mask_token_id, threshold, num_commit, temperature, seed)


@_diffusion_commit_op.register_fake
def _(logits, block, mask_token_id, threshold, num_commit, temperature, seed):
    return torch.empty_like(block)


# --- the call sites ----------------------------------------------------------------------------------


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
    """See reference.block_attention; the pass's layout says whether the kernels run."""
    if torch.onnx.is_in_onnx_export():
        from trimode.plugins.onnx_ops import block_attention_node

        return block_attention_node(q, k, v, k_cache, v_cache, layout, k_scale, v_scale)
    if _kernels(layout.kernels, q.device):
        return torch.ops.trimode.block_attention(
            q,
            k,
            v,
            k_cache,
            v_cache,
            layout.lengths,
            layout.block_tables,
            layout.is_causal,
            layout.row_width,
            k_scale,
            v_scale,
        )
    return reference.block_attention(q, k, v, k_cache, v_cache, layout, k_scale, v_scale)


def spec_accept(
    verify_logits: torch.Tensor,
    draft: torch.Tensor,
    mask_token_id: int,
    eos_ids: torch.Tensor,
    temperature: torch.Tensor | float = 0.0,
    seed: torch.Tensor | int = 0,
    kernels: bool | None = None,
) -> Accepted:
    """See reference.spec_accept: temperature [b] float32, seed [b] int64, one per sequence (a
    Python float / int means that value for every row). kernels: True / False as the caller chose
    (the ModelRunner, once); None: `use_kernels(device)`."""
    if torch.onnx.is_in_onnx_export():
        from trimode.plugins.onnx_ops import spec_accept_node

        return spec_accept_node(verify_logits, draft, mask_token_id, eos_ids, temperature, seed)
    if _kernels(kernels, verify_logits.device):
        temperature, seed = sampling_rows(temperature, seed, draft.shape[0], verify_logits.device)
        return Accepted(*torch.ops.trimode.spec_accept(verify_logits, draft, mask_token_id, eos_ids, temperature, seed))
    return reference.spec_accept(verify_logits, draft, mask_token_id, eos_ids, temperature, seed)


def diffusion_commit(
    logits: torch.Tensor,
    block: torch.Tensor,
    mask_token_id: int,
    threshold: float | None,
    num_commit: torch.Tensor | None,
    temperature: torch.Tensor | float = 0.0,
    seed: torch.Tensor | int = 0,
    kernels: bool | None = None,
) -> torch.Tensor:
    """See reference.diffusion_commit (temperature, seed and kernels as in spec_accept)."""
    if torch.onnx.is_in_onnx_export():
        from trimode.plugins.onnx_ops import diffusion_commit_node

        return diffusion_commit_node(logits, block, mask_token_id, threshold, num_commit, temperature, seed)
    if _kernels(kernels, logits.device):
        temperature, seed = sampling_rows(temperature, seed, block.shape[0], logits.device)
        return torch.ops.trimode.diffusion_commit(
            logits, block, mask_token_id, threshold, num_commit, temperature, seed
        )
    return reference.diffusion_commit(logits, block, mask_token_id, threshold, num_commit, temperature, seed)


def _kernels(choice: bool | None, device: torch.device) -> bool:
    return use_kernels(device) if choice is None else choice
