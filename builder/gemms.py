"""The compiled programs' GEMMs: the linears that read one input fused into one matrix, stored [in, out].

Per layer, q/k/v read the same normed input and so do gate/up: one GEMM each instead of three and
two (7 GEMM calls a layer become 4), and every matrix is kept pre-transposed, [in, out] contiguous,
the layout MKL's small-M GEMMs run fastest on here (measured: scripts/bench_engine.py, README).
The fused matrices are made from the model's own tensors when a program is built and again when
it is loaded (`ProgramGemms(model)`, the same code both times); the eager model is left as it is,
the oracle the engine is checked against.

FP8 linears (trimode/fp8.py) on CPU are simulated: dequantized weights, the input rounded through
E4M3 with its input_scale. A fused GEMM keeps that: its matrix is the dequantized weights (the same
values FP8Linear.simulate computes per call), and its input is rounded once, which is exact only
when the fused linears share one input_scale; linears with different input scales, and FP8 linears
on a GPU with FP8 GEMMs (torch._scaled_mm), are left as their own modules, unfused.
"""

from __future__ import annotations

import torch
from torch import nn

from trimode.fp8 import FP8Linear, fake_quant_e4m3, gpu_has_fp8
from trimode.model import NLDModel


def _dense(linear: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in] in dtype, input_scale or None) of a linear the programs may fuse, else None."""
    if type(linear) is nn.Linear and linear.bias is None:
        return linear.weight.detach(), None
    if isinstance(linear, FP8Linear) and not gpu_has_fp8(linear.weight.device):
        return (linear.weight.float() * linear.weight_scale).to(dtype), linear.input_scale
    return None


class Gemm(nn.Module):
    """x -> (x @ W_0^T, x @ W_1^T, ...) for the linears that read x: one GEMM when they can fuse."""

    def __init__(self, linears: list[nn.Module], dtype: torch.dtype):
        super().__init__()
        dense = [_dense(linear, dtype) for linear in linears]
        scales = [None if d is None else d[1] for d in dense]
        is_fusable = all(d is not None for d in dense) and (
            all(s is None for s in scales) or all(s is not None and torch.equal(s, scales[0]) for s in scales))
        self.sizes = [d[0].shape[0] for d in dense] if is_fusable else None
        self.linears = None if is_fusable else nn.ModuleList(linears)
        if is_fusable:
            self.register_buffer("weight", torch.cat([d[0] for d in dense]).t().contiguous())
            self.register_buffer("input_scale", scales[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.linears is not None:
            return tuple(linear(x) for linear in self.linears)
        if self.input_scale is not None:
            x = fake_quant_e4m3(x, self.input_scale)
        y = torch.mm(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)


class LayerGemms(nn.Module):
    def __init__(self, layer, dtype: torch.dtype):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = Gemm([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        self.o = Gemm([attn.o_proj], dtype)
        self.o_draft = None if attn.o_proj_draft is None else Gemm([attn.o_proj_draft], dtype)
        self.gate_up = Gemm([mlp.gate_proj, mlp.up_proj], dtype)
        self.down = Gemm([mlp.down_proj], dtype)


class ProgramGemms(nn.Module):
    """Every GEMM of the model's forward, per layer and the head (see the module docstring)."""

    def __init__(self, model: NLDModel):
        super().__init__()
        with torch.no_grad():
            self.layers = nn.ModuleList(LayerGemms(layer, model.dtype) for layer in model.encoder.layers)
            self.head = Gemm([model.diffusion_head], model.dtype)
