"""The quantize stage: an NLD checkpoint -> an FP8 checkpoint (ModelOpt recipe, unified HF layout).

quantize_checkpoint reads one directory and writes only its output directory, through
`trimode.stage_output` (a temporary sibling renamed at the end, nothing left behind on failure; with
force=True only a previous quantize output is replaced).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trimode import __version__
from trimode.errors import InputError
from trimode.stage_output import check_output, input_digest, stage_output, write_manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class QuantizeSettings:
    kv_cache: str = "fp8"  # "fp8" or "none"
    calib_data: Path | None = None  # None: the built-in set
    calib_samples: int = 64
    calib_seq_len: int = 256
    calib_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.kv_cache not in ("fp8", "none"):
            raise InputError(f"kv_cache: expected 'fp8' or 'none', got {self.kv_cache!r}")
        for field, least in (("calib_samples", 1), ("calib_seq_len", 2), ("calib_batch_size", 1)):
            if getattr(self, field) < least:
                raise InputError(f"{field}: expected an integer >= {least}, got {getattr(self, field)!r}")


def quantize_checkpoint(
    checkpoint_dir: Path,
    out_dir: Path,
    settings: QuantizeSettings = QuantizeSettings(),
    force: bool = False,
    progress=None,
) -> Path:
    """Calibrate FP8 scales with ModelOpt over every kind of pass, export, write manifest.json."""
    from trimode.checkpoint import load_checkpoint, read_quant_config
    from trimode.quantize.calibration import calibration_windows, read_calibration_texts
    from trimode.quantize.export import write_fp8_checkpoint
    from trimode.quantize.recipe import import_modelopt, quantize_model

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    inputs = [checkpoint_dir] + ([settings.calib_data] if settings.calib_data else [])
    check_output(out_dir, "quantize", inputs, force)  # before any input is read or module imported
    if not checkpoint_dir.is_dir():
        raise InputError(f"{checkpoint_dir}: not a directory")
    if read_quant_config(checkpoint_dir) is not None:
        raise InputError(f"{checkpoint_dir} is already quantized (hf_quant_config.json); quantize the bf16 checkpoint")
    with stage_output(out_dir, "quantize", inputs, force) as tmp:
        ck = load_checkpoint(checkpoint_dir, device="cpu", dtype=torch.float32)  # bad input fails fast,
        if settings.calib_seq_len > ck.spec.max_position_embeddings:  # windows the model has no positions for
            raise InputError(
                f"calib_seq_len {settings.calib_seq_len}: more than {checkpoint_dir / 'config.json'}'s "
                f"max_position_embeddings {ck.spec.max_position_embeddings}"
            )
        texts, source = read_calibration_texts(settings.calib_data)
        windows = calibration_windows(texts, ck.tokenizer, ck.spec, settings.calib_samples, settings.calib_seq_len)
        import_modelopt()  # before the slow import
        block_length = min(ck.spec.block_size, settings.calib_seq_len - 1)
        start = time.perf_counter()
        model, passes = quantize_model(
            ck.model, windows, block_length, settings.kv_cache == "fp8", settings.calib_batch_size, on_batch=progress
        )
        elapsed = time.perf_counter() - start
        config = json.loads((checkpoint_dir / "config.json").read_text())
        stats = write_fp8_checkpoint(model, config, tmp, settings.kv_cache == "fp8")
        for name in TOKENIZER_FILES:
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, tmp / name)
        write_manifest(
            tmp,
            _manifest(checkpoint_dir, settings, source, windows, passes, stats, elapsed, ck.model.has_draft_adapter),
        )
    return out_dir


def _manifest(checkpoint_dir, settings, source, windows, passes, stats, elapsed, has_draft) -> dict:
    import modelopt

    return {
        "stage": "quantize",
        "tool": f"trimode {__version__}",
        "versions": {
            "trimode": __version__,
            "torch": torch.__version__,
            "modelopt": modelopt.__version__,
            "python": platform.python_version(),
        },
        "input": {"path": str(checkpoint_dir), "digest_sha256": input_digest(checkpoint_dir)},
        "recipe": {
            "format": "FP8 E4M3 per-tensor, static scales",
            "algorithm": "max",
            "weights": "every Linear of encoder.* (q/k/v/o, gate/up/down"
            + (", their merged draft twins)" if has_draft else ")"),
            "activations": "the input of every quantized Linear",
            "kv_cache": settings.kv_cache,
            "not_quantized": ["encoder.embed_tokens (bf16)", "diffusion_head (bf16)", "RMSNorm weights (bf16)"],
        },
        "calibration": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
            "source": source,
            "num_windows": len(windows),
            "num_tokens": windows.numel(),
            "passes": dict(passes),
            "seconds": round(elapsed, 2),
        },
        "modules": stats,
    }
