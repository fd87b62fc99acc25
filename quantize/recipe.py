"""The FP8 recipe with NVIDIA ModelOpt: per-tensor E4M3 weights and activations for every backbone
Linear (max calibration), FP8 KV cache; embeddings and diffusion_head stay unquantized.

Calibration runs the passes every mode produces, because diffusion and draft passes see different
activation statistics than AR: causal prefill, block passes over masked blocks (first and later
denoising steps), the draft pass with the adapter on, the causal verify pass, and the quadratic pass
(the verify chain, then rows of masks with the adapter on).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections import Counter

import torch

from trimode.errors import MissingDependencyError
from trimode.model import Attention, NLDModel
from trimode.passes import MODE_PASSES, PassKind, quadratic_chunk
from trimode.plugins.reference import quadratic_tokens

EXCLUDED_MODULES = ("diffusion_head", "encoder.embed_tokens")


def import_modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise MissingDependencyError("nvidia-modelopt", "fp8") from None
    return mtq


def fp8_config(kv_cache: bool) -> dict:
    mtq = import_modelopt()
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)  # quantize() must never share ModelOpt's presets
    if kv_cache:
        cfg["quant_cfg"].extend(copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
    # The preset skips *lm_head* and nn.Embedding; NLD's head has its own name.
    cfg["quant_cfg"].append({"quantizer_name": "*diffusion_head*", "enable": False})
    return cfg


def register_kv_quantizers() -> None:
    """Teach ModelOpt our Attention: K (after RoPE) and V pass a quantizer before the cache stores them.
    ModelOpt's automatic KV patching looks for matmuls in the class source and finds none here."""
    mtq = import_modelopt()
    from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer

    if Attention in QuantModuleRegistry:
        return

    class QuantNLDAttention(QuantModule):
        def _setup(self):
            self.k_bmm_quantizer = TensorQuantizer()
            self.v_bmm_quantizer = TensorQuantizer()

        def project(self, x, cos, sin, q_scale, use_draft):
            q, k, v = super().project(x, cos, sin, q_scale, use_draft)
            return q, self.k_bmm_quantizer(k), self.v_bmm_quantizer(v)

    mtq.register(original_cls=Attention, quantized_cls=QuantNLDAttention)


# Every kind of pass some mode runs (passes.MODE_PASSES), in a fixed order.
CALIBRATION_PASSES = tuple(dict.fromkeys(kind for kinds in MODE_PASSES.values() for kind in kinds))


@torch.no_grad()
def calibration_passes(
    model: NLDModel, windows: torch.Tensor, block_length: int, batch_size: int, on_batch=None
) -> Counter[str]:
    """Run every kind of pass over the calibration windows; -> passes by kind. Each window is a
    context (the prefill, which the cache keeps) and a block, which every other kind runs over as
    that kind sees it; their K/V stay scratch past the context (a quadratic chunk's W(W+1) positions)."""
    mask_id, passes = model.spec.mask_token_id, Counter[str]()
    gen = torch.Generator().manual_seed(0)
    for batch in windows.split(batch_size):
        b, n = batch.shape
        context, block = batch[:, : n - block_length], batch[:, n - block_length :]
        first = block.clone()
        first[:, 1:] = mask_id  # first denoising step: all masked
        later = torch.where(torch.rand(block.shape, generator=gen) < 0.5, mask_id, block)
        later[:, 0] = block[:, 0]  # a later step: half committed
        inputs = {
            PassKind.PREFILL: [context],
            PassKind.DECODE: [block[:, :1]],
            PassKind.DENOISE: [first, later],
            PassKind.DRAFT: [first] if model.has_draft_adapter else [],
            PassKind.VERIFY: [block],
            PassKind.REFRESH: [block],
            PassKind.QUADRATIC: [quadratic_tokens(block, mask_id)],  # the block as the verify chain
        }
        cache = model.new_cache(b, n - block_length + quadratic_chunk(block_length))
        for kind in CALIBRATION_PASSES:
            for tokens in inputs[kind]:
                model(tokens, cache, kind)
                passes[kind.value] += b
            if kind is PassKind.PREFILL:
                cache.advance(torch.arange(b), context.shape[1])
        if on_batch:
            on_batch(b)
    return passes


def quantize_model(
    model: NLDModel, windows: torch.Tensor, block_length: int, kv_cache: bool, batch_size: int = 4, on_batch=None
) -> tuple[NLDModel, Counter]:
    """Insert ModelOpt's FP8 quantizers into `model` in place and calibrate them."""
    mtq = import_modelopt()
    if kv_cache:
        register_kv_quantizers()
    passes: Counter = Counter()

    def forward_loop(m):
        passes.update(calibration_passes(m, windows, block_length, batch_size, on_batch))

    with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints; stdout belongs to --json
        model = mtq.quantize(model, fp8_config(kv_cache), forward_loop)
    return model, passes
