"""The deploy pipeline: quantize -> build -> repo in one call, every stage's output under one folder.

    DIR/
      manifest.json   stage "deploy": per stage, what it was made from (input digest + settings)
                      and the digest of what it made
      quantized/      `trimode quantize` output (with fp8; none when the input is already FP8)
      engine/         `trimode build` output
      repo/           `trimode repo` output, serving engine/

Each stage is the stage's own function writing through the stage-output helper, so a failed or
interrupted stage leaves nothing half-written. A re-run into the same DIR reuses every stage whose
input digest and settings are unchanged and whose output is still what was made (its digest), and
redoes the rest in order (force: redoes all). DIR/manifest.json is written before the first stage
and after each, so a deploy interrupted anywhere, SIGKILL included, resumes where it stopped (a first
deploy that fails before finishing a stage removes it again: nothing written). DIR must be new, empty or a previous deploy output.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trimode import __version__
from trimode.builder.settings import BuildSettings
from trimode.errors import InputError, OutputError
from trimode.quantize import QuantizeSettings
from trimode.stage_output import MANIFEST, check_output, input_digest, make_dirs, write_manifest
from trimode.triton_repo.settings import RepoSettings

STAGE = "deploy"
FOLDERS = {"quantize": "quantized", "build": "engine", "repo": "repo"}


@dataclass(frozen=True)
class DeploySettings:
    fp8: bool = True
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    build: BuildSettings = field(default_factory=BuildSettings)
    repo: RepoSettings = field(default_factory=RepoSettings)


@dataclass
class Hooks:
    """What the CLI shows while a deploy runs (each a no-op by default)."""

    on_stage: Callable[[str, str], None] = lambda stage, status: None  # status: running | reused | skipped
    quantize_progress: Callable[[int], None] | None = None  # quantize_checkpoint's progress
    build_start: Callable | None = None  # build_engine's on_start, on_program
    build_program: Callable | None = None


def deploy(
    checkpoint_dir: Path,
    out_dir: Path,
    settings: DeploySettings = DeploySettings(),
    force: bool = False,
    hooks: Hooks | None = None,
) -> dict:
    """-> DIR's manifest; its "stages" map each stage to its record (with "reused": bool)."""
    from trimode.builder import check_backend

    hooks = hooks or Hooks()
    checkpoint_dir, out = Path(checkpoint_dir), Path(out_dir)
    out_path = check_output(out, STAGE, [checkpoint_dir], force=True)  # new, empty, or a previous deploy
    if not checkpoint_dir.is_dir():
        raise InputError(f"{checkpoint_dir}: not a directory")
    check_backend(settings.build)  # before an FP8 calibration that a missing TensorRT would waste
    previous = _read_previous(out_path)
    records = dict(previous)  # until a stage is checked again: an interrupted run keeps the later ones
    manifest = {
        "stage": STAGE,
        "tool": f"trimode {__version__}",
        "input": {"path": str(checkpoint_dir)},
        "folders": {},
        "stages": records,
    }
    # DIR/manifest.json before the first stage: a deploy SIGKILLed in it leaves a deploy output (plus the
    # stage's own leftovers, which its next run clears), which the re-run resumes instead of refusing
    is_first = not (out_path.is_dir() and any(out_path.iterdir()))
    made = make_dirs(out_path, out_dir)
    _write(out_path, manifest)
    try:
        _run_stages(checkpoint_dir, out_path, settings, force, hooks, previous, manifest)
    except BaseException:
        if is_first and not any(p.name in FOLDERS.values() for p in out_path.iterdir()):
            (out_path / MANIFEST).unlink(missing_ok=True)  # a first deploy that finished no stage leaves nothing
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    return manifest


def _run_stages(
    checkpoint_dir: Path,
    out_path: Path,
    settings: DeploySettings,
    force: bool,
    hooks: Hooks,
    previous: dict,
    manifest: dict,
) -> None:
    from trimode.builder import build_engine
    from trimode.checkpoint import read_quant_config
    from trimode.quantize import quantize_checkpoint
    from trimode.triton_repo.writer import write_model_repo

    records = manifest["stages"]

    def run(
        stage: str,
        source: Path,
        stage_settings: dict,
        make: Callable[[Path, bool], object],
        output_digest: Callable[[Path], str],
        source_digest: Callable[[Path], str] = input_digest,
    ) -> Path:
        target = out_path / FOLDERS[stage]
        record = {"input_digest": source_digest(source), "settings": stage_settings}
        old = previous.get(stage)
        if (
            not force
            and old
            and {k: old.get(k) for k in record} == record
            and target.is_dir()
            and _digest_or_none(output_digest, target) == old.get("output_digest")
        ):
            hooks.on_stage(stage, "reused")
            records[stage] = {**old, "reused": True}
        else:
            hooks.on_stage(stage, "running")
            make(target, target.exists())  # replaces only a previous output of the same stage
            records[stage] = {**record, "output_digest": output_digest(target), "reused": False}
        manifest["folders"][stage] = FOLDERS[stage]
        _write(out_path, manifest)
        return target

    source = checkpoint_dir
    if settings.fp8 and read_quant_config(checkpoint_dir) is None:
        source = run(
            "quantize",
            checkpoint_dir,
            _plain(asdict(settings.quantize)),
            lambda target, again: quantize_checkpoint(
                checkpoint_dir, target, settings.quantize, force=again, progress=hooks.quantize_progress
            ),
            input_digest,
        )
    else:
        records.pop("quantize", None)
        hooks.on_stage("quantize", "skipped")
    engine = run(
        "build",
        source,
        _plain(asdict(settings.build)),
        lambda target, again: build_engine(
            source, target, settings.build, again, hooks.build_start, hooks.build_program
        ),
        _engine_digest,
    )
    # the repository names its engine dir by absolute path: a moved deploy folder rewrites it
    run(
        "repo",
        engine,
        _plain({"engine_path": str(engine.resolve()), **asdict(settings.repo)}),
        lambda target, again: write_model_repo(engine, target, settings.repo, again),
        input_digest,
        _engine_digest,  # the build's, not its files': step times saved by `trimode bench` are no new input
    )


def _engine_digest(engine_dir: Path) -> str:
    from trimode.builder.manifest import read_manifest

    return read_manifest(engine_dir)["digest_sha256"]  # the sealed manifest names every file's sha256


def _digest_or_none(digest: Callable[[Path], str], path: Path) -> str | None:
    try:
        return digest(path)
    except Exception:  # noqa: BLE001 (an output that no longer reads is one to redo)
        return None


def _plain(settings: dict) -> dict:
    """JSON values only (tuples -> lists, enums and paths -> strings), so a reread record compares equal."""
    return json.loads(json.dumps(settings, default=lambda v: getattr(v, "value", str(v))))


def _read_previous(out: Path) -> dict:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    return {k: v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}


def _write(out: Path, manifest: dict) -> None:
    """DIR/manifest.json, replaced atomically (an interrupted deploy keeps the record of its done stages)."""
    try:
        write_manifest(out, manifest)
    except OSError as e:
        raise OutputError(f"deploy {out}: {e.strerror or e} ({e.filename or 'write failed'})") from e
