"""FP8 (E4M3, per-tensor scales) at run time: the one place linear layers and K/V meet FP8.

An FP8 checkpoint (ModelOpt's unified HF format, see quantize/) stores each backbone Linear as an
float8_e4m3fn weight with a 0-d fp32 `weight_scale` and `input_scale`, and K/V scales as
`k_proj.k_scale` / `v_proj.v_scale`. Dequantized value = fp8 code * scale. On CPU the numerics are
simulated exactly (weights dequantized, activations and K/V rounded through E4M3 with their scales);
on a GPU with FP8 tensor cores the GEMM is `torch._scaled_mm` on the FP8 codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to +-448, rounded to the nearest E4M3 code."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def fake_quant_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The value x takes after a round trip through E4M3 with this scale, in x's dtype."""
    return (quantize_e4m3(x, scale).float() * scale).to(x.dtype)


def gpu_has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """y = (x rounded through E4M3 with input_scale) @ (W_fp8 * weight_scale)^T; no bias (NLD has none)."""

    weight: torch.Tensor  # buffers
    weight_scale: torch.Tensor
    input_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor):
        super().__init__()
        assert weight.dtype == E4M3 and weight_scale.dim() == 0 and input_scale.dim() == 0
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("input_scale", input_scale.float())
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if gpu_has_fp8(x.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            return self.scaled_mm(x)
        return self.simulate(x)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The FP8 GEMM's exact numerics in x's dtype: dequantized weights, x rounded through E4M3."""
        w = self.weight.float() * self.weight_scale
        return F.linear(fake_quant_e4m3(x, self.input_scale), w.to(x.dtype))

    def scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """The real FP8 GEMM (FP8 tensor cores on Hopper/Ada; also runs on CPU in torch >= 2.13)."""
        x8 = quantize_e4m3(x.reshape(-1, self.in_features), self.input_scale)
        out = torch._scaled_mm(
            x8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale, out_dtype=x.dtype
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"
