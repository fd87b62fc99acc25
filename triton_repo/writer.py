"""The repo stage: an engine dir in, a Triton model repository out (design.md, issue 13).

    REPO/
      manifest.json                  stage "repo": the engine dir it serves (path + digest), settings, models
      <prefix>engine/                config.pbtxt + 1/model.py (python backend, decoupled or not)
      <prefix>preprocessing_<mode>/  config.pbtxt + 1/model.py, one per mode
      <prefix>postprocessing/        config.pbtxt + 1/model.py
      <prefix><mode>/                config.pbtxt + 1/ (ensemble), one per mode

The model.py files import their code from the installed trimode package, so the server's python
(PATH, notes/stack.md) must be the one trimode is installed in. The repository names the engine
dir by absolute path and its manifest digest; the engine model refuses an engine dir rebuilt since.
Before anything is written, the engine dir gets the checks every load runs but its self-test
(builder/manifest.py), and Triton's max_batch_size may not exceed the engine's slots.
"""

from __future__ import annotations

import json
from pathlib import Path

from trimode import __version__
from trimode.errors import EngineError, InputError
from trimode.passes import MODE_PASSES, PassKind
from trimode.stage_output import check_output, stage_output, write_manifest
from trimode.triton_repo.settings import DEFAULT_ENGINE_THREADS, TRTLLM_ENSEMBLE, RepoSettings

STAGE = "repo"
FORMAT = 1
_SHIM = '''"""{what} (written by `trimode repo`): the code is trimode.triton_repo.{module}, in the installed package."""
from trimode.triton_repo.{module} import TritonPythonModel  # noqa: F401
'''


def write_model_repo(
    engine_dir: Path, out_dir: Path, settings: RepoSettings = RepoSettings(), force: bool = False
) -> Path:
    """-> out_dir, holding one ensemble per mode of settings.modes over the engine dir."""
    import torch
    from google.protobuf import text_format

    from trimode.builder.engine_dir import read_step_times
    from trimode.builder.manifest import check_manifest, read_manifest
    from trimode.triton_repo.configs import (
        Names,
        engine_config,
        ensemble_config,
        postprocessing_config,
        preprocessing_config,
    )
    from trimode.triton_repo.wiring import check_wiring

    engine_dir, out_dir = Path(engine_dir).resolve(), Path(out_dir)
    check_output(out_dir, STAGE, [engine_dir], force)
    manifest = read_manifest(engine_dir)
    engine_settings = manifest["settings"]
    if engine_settings["onnx_only"]:
        raise EngineError(f"{engine_dir}: built with --onnx-only, it runs nothing; build a runnable engine")
    # the checks every load runs (seal, fields, each file's digest, versions, device, saved step times):
    # a broken engine dir fails here, not when the server loads it. Not its self-test, which loads the
    # model and runs every mode: the engine model runs it on every server start anyway (load_engine).
    check_manifest(engine_dir, manifest, torch.device(engine_settings["device"]))
    read_step_times(engine_dir, manifest)
    programs = {PassKind(p["kind"]) for p in manifest["programs"]}
    for mode in settings.modes:
        missing = set(MODE_PASSES[mode]) - {PassKind.REFRESH} - programs  # a refresh runs the prefill program
        if missing:
            raise EngineError(
                f"{engine_dir}: no {', '.join(sorted(k.value for k in missing))} program, so it "
                f"cannot serve {mode.value}; rebuild it or leave {mode.value} out of --modes"
            )
    slots = engine_settings["max_batch_size"]
    if settings.max_batch_size is not None and settings.max_batch_size > slots:  # the engine holds no more in flight
        raise InputError(
            f"max_batch_size {settings.max_batch_size}: above the engine's {slots} slots (its KV pool, "
            f"settings.max_batch_size in {engine_dir}/manifest.json); give at most {slots}, or "
            f"rebuild the engine with more"
        )
    max_batch_size = settings.max_batch_size or slots
    max_queued = settings.max_queued_requests or 8 * engine_settings["max_batch_size"]
    names = Names(settings.prefix)
    configs = {
        names.engine: engine_config(
            names, settings, max_batch_size, str(engine_dir), manifest["digest_sha256"], max_queued
        ),
        names.postprocessing: postprocessing_config(names, settings, max_batch_size, str(engine_dir)),
    }
    for mode in settings.modes:
        configs[names.preprocessing(mode)] = preprocessing_config(
            names, mode, settings, max_batch_size, str(engine_dir)
        )
        configs[names.ensemble(mode)] = ensemble_config(names, mode, max_batch_size)
    aliases = {}
    if settings.ensemble_mode is not None:
        aliases[settings.prefix + TRTLLM_ENSEMBLE] = settings.ensemble_mode.value
        configs[settings.prefix + TRTLLM_ENSEMBLE] = ensemble_config(
            names, settings.ensemble_mode, max_batch_size, settings.prefix + TRTLLM_ENSEMBLE
        )
    check_wiring(configs)  # before anything is written
    modules = {
        names.engine: "engine_model",
        names.postprocessing: "postprocessing_model",
        **{names.preprocessing(m): "preprocessing_model" for m in settings.modes},
    }
    with stage_output(out_dir, STAGE, [engine_dir], force) as tmp:
        for name, config in configs.items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text_format.MessageToString(config))
            module = modules.get(name)
            if module:  # a python model (an ensemble is its config and an empty version folder)
                (tmp / name / "1" / "model.py").write_text(_SHIM.format(what=f"Triton model {name}", module=module))
        write_manifest(
            tmp,
            {
                "stage": STAGE,
                "format": FORMAT,
                "tool": f"trimode {__version__}",
                "engine": {
                    "path": str(engine_dir),
                    "digest_sha256": manifest["digest_sha256"],
                    "backend": engine_settings["backend"],
                    "device": manifest["device"]["type"],
                    "max_batch_size": engine_settings["max_batch_size"],
                    "max_seq_len": engine_settings["max_seq_len"],
                    "block_lengths": engine_settings["block_lengths"],
                },
                "settings": {
                    "prefix": settings.prefix,
                    "modes": [m.value for m in settings.modes],
                    "max_batch_size": max_batch_size,
                    "instances": settings.instances,
                    "max_queue_delay_us": settings.max_queue_delay_us,
                    "max_queued_requests": max_queued,
                    "decoupled": settings.decoupled,
                    "threads": settings.threads or DEFAULT_ENGINE_THREADS,
                },
                "ensembles": {m.value: names.ensemble(m) for m in settings.modes},
                "aliases": aliases,  # model name -> the mode it serves again
                "models": {name: config.platform or config.backend for name, config in sorted(configs.items())},
            },
        )
    return out_dir


def read_repo_manifest(repo_dir: Path) -> dict:
    path = Path(repo_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("stage") != STAGE:
        raise EngineError(f"{repo_dir}: not a model repository written by `trimode repo` (no repo manifest.json)")
    return manifest
