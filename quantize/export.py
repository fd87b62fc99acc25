"""Write a ModelOpt-calibrated NLD model as a unified Hugging Face FP8 checkpoint in the NLD layout.

ModelOpt's own `export_hf_checkpoint` needs a transformers model; ours is not one. The format is
small enough to write directly from the calibrated quantizers, keeping the NLD names:
  <linear>.weight        float8_e4m3fn   round(W * 448 / amax): the codes ModelOpt's fake quantizer
                                         used in calibration, so the shipped model is the one calibrated
  <linear>.weight_scale  fp32, 0-d      weight amax / 448
  <linear>.input_scale   fp32, 0-d      calibrated activation amax / 448
  <attn>.k_proj.k_scale, <attn>.v_proj.v_scale   fp32, 0-d   K/V amax / 448 (ModelOpt's names)
  everything else (embeddings, norms, diffusion_head) in the source dtype (bf16)
plus hf_quant_config.json and config.json's quantization_config, as ModelOpt writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from trimode.fp8 import E4M3, E4M3_MAX
from trimode.model import NLDModel
from trimode.quantize.recipe import EXCLUDED_MODULES


def _scale(quantizer) -> torch.Tensor:
    amax = quantizer.amax
    if amax is None:
        raise RuntimeError(f"quantizer {quantizer} was never calibrated")  # a recipe bug, not user input
    return (amax.float().reshape(()) / E4M3_MAX).clamp_min(1e-12)


def fp8_state_dict(model: NLDModel, dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors by NLD name, per-module statistics). Reads the quantizers; never mutates the model."""
    out: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    handled: set[str] = set()
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(module, nn.Linear) and wq is not None and wq.is_enabled:
            w_scale, x_scale = _scale(wq), _scale(module.input_quantizer)
            # W * (448 / amax), as ModelOpt computes it: dividing by amax / 448 instead breaks the
            # many exact ties of bf16 weights the other way (W / scale lands on a midpoint).
            codes = module.weight.detach().float() * (E4M3_MAX / wq.amax.float())
            out[f"{name}.weight"] = codes.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
            out[f"{name}.weight_scale"], out[f"{name}.input_scale"] = w_scale, x_scale
            stats[name] = {
                "weight_amax": round(float(w_scale) * E4M3_MAX, 6),
                "input_amax": round(float(x_scale) * E4M3_MAX, 6),
            }
            handled.add(f"{name}.weight")
        kq = getattr(module, "k_bmm_quantizer", None)
        if kq is not None and kq.is_enabled:
            out[f"{name}.k_proj.k_scale"] = _scale(kq)
            out[f"{name}.v_proj.v_scale"] = _scale(module.v_bmm_quantizer)
            stats[name] = {
                "k_amax": round(float(out[f"{name}.k_proj.k_scale"]) * E4M3_MAX, 6),
                "v_amax": round(float(out[f"{name}.v_proj.v_scale"]) * E4M3_MAX, 6),
            }
    for name, tensor in model.state_dict().items():
        if name in handled or "_quantizer" in name:
            continue
        out[name] = tensor.detach().to(dtype)
    return {k: v.contiguous() for k, v in out.items()}, stats


def quant_config(kv_cache: bool) -> dict:
    from modelopt import __version__ as modelopt_version

    return {
        "producer": {"name": "modelopt", "version": modelopt_version},
        "quantization": {
            "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8" if kv_cache else None,
            "exclude_modules": list(EXCLUDED_MODULES),
        },
    }


def hf_quantization_config(kv_cache: bool) -> dict:
    """config.json's quantization_config (compressed-tensors style, as ModelOpt's HF export writes)."""
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    cfg = {
        "quant_method": "modelopt",
        "quant_algo": "FP8",
        "ignore": list(EXCLUDED_MODULES),
        "config_groups": {"group_0": {"input_activations": fp8, "weights": fp8, "targets": ["Linear"]}},
    }
    if kv_cache:
        cfg["kv_cache_scheme"] = fp8
    return cfg


def write_fp8_checkpoint(model: NLDModel, config: dict, out_dir: Path, kv_cache: bool) -> dict:
    """Write safetensors + hf_quant_config.json + config.json into out_dir; -> per-module statistics."""
    tensors, stats = fp8_state_dict(model)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "hf_quant_config.json").write_text(json.dumps(quant_config(kv_cache), indent=2) + "\n")
    config = {**config, "quantization_config": hf_quantization_config(kv_cache)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return stats
