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

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from trimode.fp8 import FP8Linear, fake_quant_e4m3, gpu_has_fp8
from trimode.model import DRAFT_LINEARS, NLDModel, linear


def _dense(linear: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in] in dtype, input_scale or None) of a linear the programs may fuse, else None."""
    if type(linear) is nn.Linear and linear.bias is None:
        return linear.weight.detach(), None
    if isinstance(linear, FP8Linear) and not gpu_has_fp8(linear.weight.device):
        return (linear.weight.float() * linear.weight_scale).to(dtype), linear.input_scale
    return None


class Gemm(nn.Module):
    """x -> (x @ W_0^T, x @ W_1^T, ...) for the linears that read x: one GEMM when they can fuse."""

    weight: torch.Tensor  # buffers, when the linears fuse
    input_scale: torch.Tensor | None

    def __init__(self, linears: list[nn.Module], dtype: torch.dtype):
        super().__init__()
        dense = [d for linear in linears if (d := _dense(linear, dtype)) is not None]
        scales = [scale for _, scale in dense]
        first = scales[0] if scales else None
        is_fusable = len(dense) == len(linears) and (
            all(s is None for s in scales)
            or (first is not None and all(s is not None and torch.equal(s, first) for s in scales))
        )
        self.sizes = [d[0].shape[0] for d in dense] if is_fusable else None
        self.linears = None if is_fusable else nn.ModuleList(linears)
        if is_fusable:
            self.register_buffer("weight", torch.cat([d[0] for d in dense]).t().contiguous())
            self.register_buffer("input_scale", first)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.linears is not None:
            return tuple(linear(x) for linear in self.linears)
        if self.input_scale is not None:
            x = fake_quant_e4m3(x, self.input_scale)
        y = torch.mm(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        assert self.sizes is not None  # set whenever the linears fused (self.linears is None)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)


# A layer's GEMMs: the linears each fuses (one owner per group: model.DRAFT_LINEARS).
GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class LayerGemms(nn.Module):
    """qkv, o, gate_up, down; and `<group>_draft` for each group with a linear the draft adapter
    adapts (the draft twins in place of those linears, the base linears for the rest)."""

    def __init__(self, layer, dtype: torch.dtype):
        super().__init__()
        for group, names in GROUPS.items():
            owner = getattr(layer, DRAFT_LINEARS[names[0]])
            setattr(self, group, Gemm([getattr(owner, n) for n in names], dtype))
            twins = [linear(owner, n, use_draft=True) for n in names]
            is_adapted = any(getattr(owner, f"{n}_draft") is not None for n in names)
            setattr(self, f"{group}_draft", Gemm(twins, dtype) if is_adapted else None)

    def run(self, group: str, x: torch.Tensor, use_draft: bool | slice) -> tuple[torch.Tensor, ...]:
        """The group's GEMM on x [b, L, in], or its draft GEMM when the adapter adapts the group and
        use_draft (a PassKind.draft_rows) says so: on every row (the draft pass), or on the rows of a
        slice (a quadratic pass's masks; its verify chain before them keeps the base GEMM), as
        model.linear does: two GEMMs then, neither on every row."""
        base, draft = getattr(self, group), getattr(self, f"{group}_draft")
        if draft is None or use_draft is False:
            return base(x)
        if use_draft is True:
            return draft(x)
        start = use_draft.start
        return tuple(torch.cat(pair, dim=1) for pair in zip(base(x[:, :start]), draft(x[:, start:])))


class ProgramGemms(nn.Module):
    """Every GEMM of the model's forward, per layer and the head (see the module docstring)."""

    layers: Sequence[LayerGemms]  # an nn.ModuleList, typed by what it holds

    def __init__(self, model: NLDModel):
        super().__init__()
        with torch.no_grad():
            self.layers = cast(
                Sequence[LayerGemms], nn.ModuleList(LayerGemms(layer, model.dtype) for layer in model.encoder.layers)
            )
            self.head = Gemm([model.diffusion_head], model.dtype)
