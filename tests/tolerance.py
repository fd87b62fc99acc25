"""Tolerances for comparing two float computations of the same values, from an error bound, not from
the error one machine happened to show.

Two correct computations of a sum of K terms that differ only in summation order (another ISA's
vector width, another BLAS kernel, another fused or tiled program) each err by at most about
K * u * sum|terms| (Higham, gamma_K; u = 2^-24 in fp32, 2^-53 in fp64), so they differ by at most
twice that. A forward pass chains such sums: first order, their relative errors add. So the bound
used here is

    2 * u * (sum of the accumulation lengths on the path from input to output) * max|output|

with the output's largest magnitude (at least 1: a small result may still sum large terms) standing
in for the magnitude of what each sum adds up. It is
a bound for "same math, other order", far above the observed error (1e-6 to 2e-5 on the tiny
models) and far below what a real bug gives (a wrong mask, a missing adapter: 1e-2 and up).
"""

from __future__ import annotations

import torch

from trimode.config import ModelSpec


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def forward_accumulations(spec: ModelSpec, span: int) -> int:
    """The accumulation lengths on one path from token ids to logits: per layer two RMSNorms, the
    q/k/v GEMM, attention scores (head_dim), the softmax sum and the weighted sum of values (span
    keys each), o_proj, gate/up and down_proj; then the final norm and the head."""
    h, heads = spec.hidden_size, spec.num_attention_heads * spec.head_dim
    per_layer = h + h + spec.head_dim + span + span + heads + h + h + spec.intermediate_size
    return spec.num_hidden_layers * per_layer + h + h


def attention_accumulations(head_dim: int, span: int) -> int:
    """One attention output: the scores (head_dim), the softmax sum and the weighted sum (span keys each)."""
    return head_dim + 2 * span


def bound(reference: torch.Tensor, accumulations: int) -> float:
    """The atol (with rtol=0) for another summation order of `reference` (module docstring)."""
    scale = reference.detach().abs().max().item()
    return 2 * unit_roundoff(reference.dtype) * accumulations * max(scale, 1.0)


def forward_bound(reference: torch.Tensor, spec: ModelSpec, span: int) -> float:
    """`bound` for logits (or anything computed along the forward) over `span` keys."""
    return bound(reference, forward_accumulations(spec, span))
