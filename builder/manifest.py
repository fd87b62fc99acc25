"""An engine dir's manifest: what was built, with what, for which machine; and the checks that
refuse an engine dir that does not fit the running libraries and device, or was changed after
its build. Every refusal is one line that says what to rebuild."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

import torch

from trimode.errors import EngineError
from trimode.stage_output import MANIFEST, file_digest

FORMAT = 2  # 2: one block program per block length, with a causal input (torch backend)
STAGE = "build"
# The libraries each backend's files depend on: a different version on load means a rebuild.
LIBRARIES = {"torch": ("torch",), "onnx": ("torch", "onnx", "onnxruntime", "onnxruntime-extensions"),
             "tensorrt": ("torch", "onnx", "tensorrt")}
# Recorded for the record, not checked (kernels are compiled per device, never stored).
INFORMATIVE = ("triton", "transformers", "nvidia-modelopt")


def library_versions(backend: str) -> dict[str, str | None]:
    names = (*LIBRARIES[backend], *INFORMATIVE)
    return {name: _version(name) for name in names}


def _version(name: str) -> str | None:
    if name == "torch":
        return torch.__version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_info(device: torch.device) -> dict:
    """What a compiled program is tied to: the GPU's compute capability, or the CPU's vector ISA
    (AOTInductor compiles CPU code for the build machine's)."""
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device),
                "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device)))}
    return {"type": "cpu", "name": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()}


def seal(manifest: dict) -> dict:
    """The manifest plus a digest of itself: an edit by hand is then detected on load."""
    body = {k: v for k, v in manifest.items() if k != "digest_sha256"}
    return {**body, "digest_sha256": _json_digest(body)}


def _json_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_digests(engine_dir: Path) -> dict[str, str]:
    """sha256 of every file of the engine dir but the manifest, by relative path."""
    return {str(p.relative_to(engine_dir)): file_digest(p) for p in sorted(engine_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def read_manifest(engine_dir: Path) -> dict:
    path = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: not a directory (build one with `trimode build`)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{engine_dir}: no {MANIFEST}; not an engine dir (build one with `trimode build`)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise EngineError(f"{path}: unreadable ({type(e).__name__}); rebuild the engine") from None
    if not isinstance(manifest, dict) or manifest.get("stage") != STAGE:
        stage = manifest.get("stage") if isinstance(manifest, dict) else None
        what = f"a {stage} output" if isinstance(stage, str) else f"its {MANIFEST} is not a trimode manifest"
        raise EngineError(f"{engine_dir}: {what}, not an engine dir (build one with `trimode build`)")
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{engine_dir}: engine format {manifest.get('format')!r}, this trimode reads {FORMAT}; "
                          f"rebuild the engine")
    return manifest


def check_manifest(engine_dir: Path, manifest: dict, device: torch.device) -> None:
    """Refuse an engine dir edited after its build, with changed or missing files, built with other
    library versions, or for another device."""
    if manifest.get("digest_sha256") != _json_digest({k: v for k, v in manifest.items() if k != "digest_sha256"}):
        raise EngineError(f"{engine_dir}/{MANIFEST} was edited after the build; rebuild the engine")
    found = file_digests(engine_dir)
    for name, digest in manifest["files"].items():
        if name not in found:
            raise EngineError(f"{engine_dir}: {name} is missing; rebuild the engine")
        if found[name] != digest:
            raise EngineError(f"{engine_dir}: {name} changed after the build; rebuild the engine")
    extra = sorted(set(found) - set(manifest["files"]))
    if extra:
        raise EngineError(f"{engine_dir}: {extra[0]} was not part of the build; rebuild the engine")
    backend = manifest["settings"]["backend"]
    for name in LIBRARIES[backend]:
        built, running = manifest["versions"].get(name), _version(name)
        if built != running:
            raise EngineError(f"{engine_dir}: built with {name} {built}, running {name} {running}; rebuild the "
                              f"engine with this {name}")
    built, here = manifest["device"], device_info(device)
    if built != here:
        differs = next(k for k in ("type", "compute_capability", "isa", "name") if built.get(k) != here.get(k))
        raise EngineError(f"{engine_dir}: built for {built['type']} {differs} {built.get(differs)}, this device has "
                          f"{here.get(differs)}; rebuild the engine on this machine")
