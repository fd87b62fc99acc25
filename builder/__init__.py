"""The build stage: a (quantized) checkpoint in, an engine dir out (design.md, issue 12).

`build_engine(checkpoint_dir, out_dir, settings)` writes through the stage-output helper:
the checkpoint's files (stored once), the backend's programs, and a manifest whose self-test is
checked against the eager reference model before anything is renamed into place. So a build
either gives an engine whose tokens equal the reference's, or leaves nothing behind.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from trimode import __version__
from trimode.builder.settings import BuildSettings
from trimode.errors import CheckpointError, EngineError, InputError
from trimode.stage_output import check_output, input_digest, stage_output, write_manifest

__all__ = ["BuildSettings", "build_engine", "check_backend"]


def check_backend(settings: BuildSettings):
    """-> the backend's module, once it is known to run here: a missing TensorRT, GPU or CUDA device
    stops here (deploy calls it before quantizing), before anything is written."""
    from trimode.builder.engine_dir import backend_module

    backend = backend_module(settings.backend)
    backend.require(settings)
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible here")
    return backend


def check_finite(checkpoint_dir: Path, model: torch.nn.Module) -> None:
    """Refuse weights with a NaN or an infinity, naming the tensor: compiling them would fail far from
    the cause (NaN != NaN, so a compiled constant no longer equals the matrix it was made from)."""
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        values = t.float() if t.dtype.itemsize == 1 else t  # isfinite has no float8 kernel
        bad = int(values.numel() - torch.isfinite(values).sum())
        if bad:
            raise CheckpointError(
                f"{checkpoint_dir}: weight {name!r} has {bad} non-finite value(s) (NaN or inf); "
                f"fix or re-export the checkpoint"
            )


def kv_blocks_for(settings: BuildSettings, model) -> int | None:
    """The blocks --kv-cache-memory holds for this model's K/V dtype on its device (None: no budget
    given, the default pool). A budget below one max_seq_len sequence: InputError with the numbers."""
    from trimode.kv_cache import blocks_for_memory

    if settings.kv_cache_memory is None:
        return None
    return blocks_for_memory(
        model.spec, model.kv_dtype, settings.block_size, settings.max_seq_len, settings.kv_cache_memory, model.device
    )


def kv_cache_record(model, settings: BuildSettings) -> dict:
    """The manifest's "kv_cache": the pool an engine of these settings allocates (the null block counted)."""
    from trimode.kv_cache import block_bytes

    return {
        "block_size": settings.block_size,
        "num_blocks": settings.pool_blocks,
        "dtype": str(model.kv_dtype).removeprefix("torch."),
        "bytes": (settings.pool_blocks + 1) * block_bytes(model.spec, settings.block_size, model.kv_dtype),
    }


def build_engine(
    checkpoint_dir: Path,
    out_dir: Path,
    settings: BuildSettings = BuildSettings(),
    force: bool = False,
    on_start: Callable[[list], None] | None = None,
    on_program: Callable | None = None,
) -> dict:
    """-> the manifest. on_start(shapes) once the shapes are known, on_program(shape) after each."""
    from trimode.builder.engine_dir import (
        CHECKPOINT_DIR,
        SELF_TEST_PROMPTS,
        SELF_TEST_TOKENS,
        auto_prior,
        check_pool,
        self_test,
    )
    from trimode.builder.manifest import FORMAT, STAGE, device_info, file_digests, library_versions, seal
    from trimode.builder.program import pass_shapes
    from trimode.checkpoint import load_checkpoint, read_quant_config
    from trimode.decoding import EngineConfig

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_output(out_dir, STAGE, [checkpoint_dir], force)
    backend = check_backend(settings)
    device = torch.device(settings.device)
    # a non-NLD checkpoint fails here, nothing written; MODEL_DTYPE: a backend that computes in one dtype
    # (onnx: fp32) is checked against the eager model in that dtype
    ck = load_checkpoint(checkpoint_dir, device=device, dtype=getattr(backend, "MODEL_DTYPE", None))
    settings = settings.resolved(ck.spec.block_size, kv_blocks_for(settings, ck.model))
    if settings.max_seq_len > ck.spec.max_position_embeddings:
        raise InputError(
            f"--max-seq-len {settings.max_seq_len}: above the model's max_position_embeddings "
            f"({ck.spec.max_position_embeddings})"
        )
    check_finite(checkpoint_dir, ck.model)
    check_pool(ck.model, settings.pool_blocks, settings.block_size)
    shapes = pass_shapes(settings.block_lengths, settings.max_seq_len)
    if on_start:
        on_start(shapes)
    config = EngineConfig(
        settings.max_batch_size,
        settings.max_seq_len,
        settings.max_input_len,
        kv_block_size=settings.kv_block_size,
        num_kv_blocks=settings.num_kv_blocks,
    )
    with stage_output(out_dir, STAGE, [checkpoint_dir], force) as tmp:
        shutil.copytree(checkpoint_dir, tmp / CHECKPOINT_DIR, ignore=shutil.ignore_patterns("manifest.json"))
        began = time.perf_counter()
        built = backend.build(ck.model, shapes, tmp, settings, on_program or (lambda shape: None))
        manifest = {
            "stage": STAGE,
            "format": FORMAT,
            "tool": f"trimode {__version__}",
            "settings": asdict(settings),
            "versions": library_versions(settings.backend)
            | {"trimode": __version__, "python": platform.python_version()},
            "device": device_info(device),
            "model": {
                "config": json.loads((checkpoint_dir / "config.json").read_text()),
                "dtype": str(ck.model.dtype).removeprefix("torch."),
                "has_draft_adapter": ck.model.has_draft_adapter,
            },
            "quantization": read_quant_config(checkpoint_dir),
            "kv_cache": kv_cache_record(ck.model, settings),
            "input": {"path": str(checkpoint_dir), "digest_sha256": input_digest(checkpoint_dir)},
            "programs": [{"kind": s.kind.value, "length": s.length, "name": s.name} for s in shapes],
            "build_seconds": round(time.perf_counter() - began, 1),
            "backend": built,
        }
        block_length = settings.block_lengths[0]
        tokens = self_test(ck.model, ck.tokenizer, None, config, block_length)  # the eager reference
        if not settings.onnx_only:
            engine_backend = backend.load(tmp, ck.model, built)
            engine_tokens = self_test(ck.model, ck.tokenizer, engine_backend, config, block_length)
            for mode, expected in tokens.items():
                if engine_tokens[mode] != expected:
                    raise EngineError(
                        f"the built {settings.backend} engine's {mode} tokens differ from the eager "
                        f"reference's on the self-test prompts; nothing was written"
                    )
            manifest["auto"] = auto_prior(ck.model, ck.tokenizer, engine_backend, config, settings.block_lengths)
        manifest["self_test"] = {
            "prompts": list(SELF_TEST_PROMPTS),
            "max_new_tokens": SELF_TEST_TOKENS,
            "block_length": block_length,
            "tokens": tokens,
        }
        manifest["files"] = file_digests(tmp)
        manifest = seal(manifest)
        write_manifest(tmp, manifest)
    return manifest
