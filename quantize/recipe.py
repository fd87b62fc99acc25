"""The FP8 recipe with NVIDIA ModelOpt: per-tensor E4M3 weights and activations for every backbone
Linear (max calibration), FP8 KV cache; embeddings and diffusion_head stay unquantized.

Calibration runs the passes every mode produces, because diffusion and draft passes see different
activation statistics than AR: causal prefill, block passes over masked blocks (first and later
denoising steps), the draft pass with the adapter on, and the causal verify pass.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections import Counter

import torch

from trimode.errors import MissingDependencyError
from trimode.model import Attention, NLDModel, Pattern

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

        def project(self, x, cos, sin, q_scale):
            q, k, v = super().project(x, cos, sin, q_scale)
            return q, self.k_bmm_quantizer(k), self.v_bmm_quantizer(v)

    mtq.register(original_cls=Attention, quantized_cls=QuantNLDAttention)


@torch.no_grad()
def calibration_passes(model: NLDModel, windows: torch.Tensor, block_length: int, batch_size: int,
                       on_batch=None) -> Counter:
    """Run every kind of pass over the calibration windows; -> passes by kind."""
    mask_id, passes = model.spec.mask_token_id, Counter()
    gen = torch.Generator().manual_seed(0)
    for batch in windows.split(batch_size):
        b, n = batch.shape
        context, block = batch[:, :n - block_length], batch[:, n - block_length:]
        rows = torch.arange(b)
        cache = model.new_cache(b, n)
        model(context, cache, Pattern.CAUSAL)                           # prefill
        cache.advance(rows, context.shape[1])
        first = block.clone()
        first[:, 1:] = mask_id                                          # first denoising step: all masked
        later = torch.where(torch.rand(block.shape, generator=gen) < 0.5, mask_id, block)
        later[:, 0] = block[:, 0]                                       # a later step: half committed
        model(first, cache, Pattern.BLOCK)
        model(later, cache, Pattern.BLOCK)
        passes.update(prefill=b, denoise=2 * b)
        if model.has_draft_adapter:
            model(first, cache, Pattern.BLOCK, use_draft=True)          # self-spec draft
            passes.update(draft=b)
        model(block, cache, Pattern.CAUSAL)                             # verify / refresh
        passes.update(verify=b)
        if on_batch:
            on_batch(b)
    return passes


def quantize_model(model: NLDModel, windows: torch.Tensor, block_length: int, kv_cache: bool,
                   batch_size: int = 4, on_batch=None) -> tuple[NLDModel, Counter]:
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
