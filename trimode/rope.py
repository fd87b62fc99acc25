"""Rotary positions (spec §3): YaRN frequencies and Llama-4 query scaling."""

from __future__ import annotations

import math

import torch

from trimode.config import RopeSpec


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope: RopeSpec, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scaling factor (the standard YaRN recipe)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (rope.rope_theta**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    factor = rope.factor
    if rope.attention_factor is not None:
        attn_scale = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attn_scale = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attn_scale = _yarn_mscale(factor)

    # Dimensions rotating fewer than beta_slow times over the original context get interpolated
    # by `factor`, those rotating more than beta_fast times keep their frequency; linear ramp between.
    def correction_dim(num_rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return head_dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.rope_theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep frequency), 0 = interpolate
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv_freq, attn_scale


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attn_scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, L] -> cos, sin [B, L, head_dim] (computed in fp32, then cast)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attn_scale).to(dtype), (emb.sin() * attn_scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, D]; rotate-half layout (Hugging Face weight order)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def llama4_query_scale(positions: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """[B, L] -> [B, L, 1, 1]: 1 + beta * log(1 + floor(pos / original_max)); 1.0 below it."""
    scaled = torch.floor(positions.float() / rope.original_max_position_embeddings)
    return (1 + rope.llama_4_scaling_beta * torch.log1p(scaled))[:, :, None, None]
