"""An engine dir's manifest: what was built, with what, for which machine; and the checks that
refuse an engine dir that does not fit the running libraries and device, or was changed after
its build. Every refusal is one line that says what to rebuild."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeGuard

import torch

from trimode.builder.settings import DEVICES, BuildSettings
from trimode.decoding.auto import choice_name, choices
from trimode.errors import EngineError, InputError
from trimode.passes import MODE_PASSES, Mode, PassKind
from trimode.stage_output import MANIFEST, file_digest

# 2: one block program per block length, with a causal input (torch backend); 3: a paged KV pool;
# 4: a quadratic program per block length, and its mode in the self-test; 5: auto's step times at every block length
FORMAT = 5
FORMAT_CHANGES = {
    3: "the KV cache became a pool of blocks (--kv-block-size, --kv-cache-memory)",
    4: "engines run quadratic self-speculation: a program per block length and its self-test",
    5: "auto chooses the block length too: the build times its steps at every one",
}
STAGE = "build"
STEP_TIMES = "step_times.json"  # auto's step times measured by `trimode bench` (engine_dir.save_step_times)
STEP_TIMES_PART = re.compile(rf"\.{re.escape(STEP_TIMES)}\.\d+\.part")  # the same being written, by a process id
# The libraries each backend's files depend on: a different version on load means a rebuild.
LIBRARIES = {
    "torch": ("torch",),
    "onnx": ("torch", "onnx", "onnxruntime", "onnxruntime-extensions"),
    "tensorrt": ("torch", "onnx", "tensorrt"),
}
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
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        }
    return {"type": "cpu", "name": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()}


def seal(manifest: dict) -> dict:
    """The manifest plus a digest of itself: an edit by hand is then detected on load."""
    body = {k: v for k, v in manifest.items() if k != "digest_sha256"}
    return {**body, "digest_sha256": _json_digest(body)}


def _json_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_digests(engine_dir: Path) -> dict[str, str]:
    """sha256 of every file of the engine dir but the manifest and the step times (measured after
    the build, and no part of what it runs: engine_dir.save_step_times), by relative path."""
    return {
        str(p.relative_to(engine_dir)): file_digest(p)
        for p in sorted(engine_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not is_step_times(engine_dir, p)
    }


def is_step_times(engine_dir: Path, path: Path) -> bool:
    """Whether path is the engine dir's step times, or a copy of them being written."""
    return path.parent == engine_dir and (path.name == STEP_TIMES or bool(STEP_TIMES_PART.fullmatch(path.name)))


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
        found = manifest.get("format")
        changes = [f"format {v}, {FORMAT_CHANGES[v]}" for v in FORMAT_CHANGES if type(found) is int and found < v]
        since = f" (since then: {'; '.join(changes)})" if changes else ""
        raise EngineError(
            f"{engine_dir}: engine format {found!r}, this trimode reads {FORMAT}{since}; "
            f"rebuild the engine with `trimode build`"
        )
    if manifest.get("digest_sha256") != _json_digest({k: v for k, v in manifest.items() if k != "digest_sha256"}):
        raise EngineError(f"{engine_dir}/{MANIFEST} was edited after the build; rebuild the engine")
    check_fields(engine_dir, manifest)
    return manifest


def check_manifest(engine_dir: Path, manifest: dict, device: torch.device) -> None:
    """Refuse an engine dir (its manifest as read_manifest returns it) with changed, missing or extra
    files, built with other library versions, or for another device."""
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
            raise EngineError(
                f"{engine_dir}: built with {name} {built}, running {name} {running}; rebuild the "
                f"engine with this {name}"
            )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(
            f"{engine_dir}: device cuda, and no CUDA device is visible here; run it on a GPU "
            f"machine, or rebuild the engine with --device cpu"
        )
    built, here = manifest["device"], device_info(device)
    if built != here:
        differs = next(k for k in ("type", "compute_capability", "isa", "name") if built.get(k) != here.get(k))
        raise EngineError(
            f"{engine_dir}: built for {built['type']} {differs} {built.get(differs)}, this device has "
            f"{here.get(differs)}; rebuild the engine on this machine"
        )


def check_fields(engine_dir: Path, manifest: dict) -> None:
    """Every field a reader of the engine dir uses (load_engine, the backends' load, repo, inspect) has
    the type and the value a build writes: a manifest edited and re-sealed by hand is refused with one
    line naming the field, never a KeyError further on. Every path in it must be a file of the build
    (so its digest is checked) inside the engine dir, also through symlinks: no program is loaded
    from elsewhere."""
    from trimode.builder.program import pass_shapes

    def field(*keys, ok: Callable[[object], bool], expected: str):
        value = manifest
        for key in keys:
            value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING or not ok(value):
            got = "nothing" if value is _MISSING else _short(value)
            raise EngineError(
                f"{engine_dir}/{MANIFEST}: {'.'.join(keys)}: expected {expected}, got {got}; rebuild the engine"
            )
        return value

    for key in ("tool", "digest_sha256"):
        field(key, ok=_is_str, expected="a string")
    field("build_seconds", ok=lambda v: type(v) in (int, float), expected="a number")
    field("settings", ok=_is_dict, expected="an object")
    backend = field("settings", "backend", ok=lambda v: _is_str(v) and v in LIBRARIES, expected=" | ".join(LIBRARIES))
    field("settings", "device", ok=lambda v: v in DEVICES, expected=" | ".join(DEVICES))
    for key in ("max_batch_size", "max_seq_len", "max_input_len", "kv_block_size", "num_kv_blocks"):
        field("settings", key, ok=_is_count, expected="an integer >= 1")
    field("settings", "kv_cache_memory", ok=lambda v: v is None or _is_str(v), expected="a string or null")
    lengths = field(
        "settings",
        "block_lengths",
        ok=lambda v: _is_list(v, _is_count) and len(v) > 0,
        expected="a list of integers >= 1",
    )
    onnx_only = field("settings", "onnx_only", ok=lambda v: isinstance(v, bool), expected="true or false")
    settings = manifest["settings"]
    try:  # their relations, as `trimode build` checks them
        checked = BuildSettings(
            **{
                k: settings[k]
                for k in (
                    "backend",
                    "max_batch_size",
                    "max_seq_len",
                    "max_input_len",
                    "device",
                    "onnx_only",
                    "kv_block_size",
                    "kv_cache_memory",
                    "num_kv_blocks",
                )
            },
            block_lengths=tuple(lengths),
        )
    except InputError as e:
        raise EngineError(f"{engine_dir}/{MANIFEST}: settings: {e}; rebuild the engine") from None
    field("versions", ok=lambda v: _is_dict(v, lambda x: x is None or _is_str(x)), expected="{library: version}")
    field("device", ok=lambda v: _is_dict(v, _is_str), expected="{key: string}")
    field("device", "type", ok=lambda v: v in DEVICES, expected=" | ".join(DEVICES))
    field("model", "config", ok=_is_dict, expected="an object")
    field("model", "dtype", ok=_is_str, expected="a string")
    field("model", "has_draft_adapter", ok=lambda v: isinstance(v, bool), expected="true or false")
    field("quantization", ok=lambda v: v is None or _is_dict(v), expected="an object or null")
    block_size = checked.block_size
    field("kv_cache", "block_size", ok=lambda v: v == block_size, expected=f"{block_size} (the settings')")
    field(
        "kv_cache",
        "num_blocks",
        ok=lambda v: v == settings["num_kv_blocks"],
        expected=f"settings.num_kv_blocks ({settings['num_kv_blocks']})",
    )
    field("kv_cache", "dtype", ok=_is_str, expected="a string")
    field("kv_cache", "bytes", ok=_is_count, expected="an integer >= 1")
    for key in ("path", "digest_sha256"):
        field("input", key, ok=_is_str, expected="a string")

    files = field("files", ok=_is_dict, expected="{path: sha256}")
    root = engine_dir.resolve()
    for name in files:
        field("files", name, ok=_is_sha256, expected="a sha256 hex digest")
        if not _lies_under(engine_dir / name, root):
            raise EngineError(
                f"{engine_dir}/{MANIFEST}: files: {name!r} leads outside the engine dir; rebuild the engine"
            )
    passes = pass_shapes(tuple(lengths), settings["max_seq_len"])
    shapes = [{"kind": s.kind.value, "length": s.length, "name": s.name} for s in passes]
    names = [s.name for s in passes]
    field("programs", ok=lambda v: v == shapes, expected=f"the passes of block lengths {lengths} ({', '.join(names)})")

    field("backend", ok=_is_dict, expected="an object")
    own = field(
        "backend",
        "files",
        ok=lambda v: _is_list(v, lambda f: _is_str(f) and f in files),
        expected="a list of files of the build (files)",
    )
    for key in (
        "max_seq_len",
        "max_input_len",
        "kv_block_size",
        "num_kv_blocks",
        *(("max_batch_size",) if backend != "torch" else ()),
    ):
        field("backend", key, ok=lambda v: v == settings[key], expected=f"settings.{key} ({settings[key]})")

    def program_files(key: str, every: bool) -> None:
        """backend[key]: {program: file} for every program (every) or some, each a file the backend wrote."""
        field(
            "backend",
            key,
            ok=lambda v: _is_dict(v) and (set(v) == set(names) if every else set(v) <= set(names)),
            expected=f"{{program: file}} for {'every one' if every else 'some'} of {', '.join(names)}",
        )
        for name in manifest["backend"][key]:
            field("backend", key, name, ok=lambda v: v in own, expected="one of backend.files")

    if backend == "torch":
        program_files("programs", every=True)
        field("backend", "draft", ok=lambda v: _is_list(v, lambda n: n in names), expected="a list of programs")
        if "batch1_programs" in manifest["backend"]:  # absent: none (load reads it with a default)
            program_files("batch1_programs", every=False)
        if "batch1_skipped" in manifest["backend"]:  # the same
            field(
                "backend",
                "batch1_skipped",
                ok=lambda v: _is_dict(v, _is_str) and set(v) <= set(names),
                expected="{program: why it has no batch-1 copy}",
            )
        if "blocked_constants" in manifest["backend"]:  # the same
            field(
                "backend",
                "blocked_constants",
                ok=lambda v: _is_dict(v, lambda c: _is_dict(c, _is_blocked_source)) and set(v) <= set(own),
                expected="{file of backend.files: {constant: [matrix, block width]}}",
            )
    elif backend == "onnx":
        program_files("programs", every=True)
    else:  # tensorrt: an --onnx-only build has no engines
        program_files("engines", every=not onnx_only)
        field("backend", "pool_dtype", ok=_is_str, expected="a string")

    field("self_test", ok=_is_dict, expected="an object")
    prompts = field(
        "self_test", "prompts", ok=lambda v: _is_list(v, _is_str) and len(v) > 0, expected="a list of strings"
    )
    field("self_test", "max_new_tokens", ok=_is_count, expected="an integer >= 1")
    field("self_test", "block_length", ok=lambda v: v in lengths, expected=f"one of settings.block_lengths {lengths}")
    # the modes that run the quadratic pass only where one cycle of it fits max_seq_len (engine_dir.self_test)
    every = {m.value for m in Mode}
    required = {m.value for m in Mode if PassKind.QUADRATIC not in MODE_PASSES[m]}
    modes = field(
        "self_test",
        "tokens",
        ok=lambda v: _is_dict(v) and required <= set(v) <= every,
        expected=f"the tokens of {', '.join(sorted(required))} and of {', '.join(sorted(every - required))} where "
        f"they fit max_seq_len",
    )
    for mode in modes:
        field(
            "self_test",
            "tokens",
            mode,
            ok=lambda v: _is_list(v, lambda row: _is_list(row, _is_token)) and len(v) == len(prompts),
            expected=f"one list of token ids per prompt ({len(prompts)})",
        )
    if "auto" in manifest:  # engines built with --onnx-only have none
        field("auto", "seconds", ok=lambda v: is_step_table(v, lengths), expected=step_table_expected(lengths))


def is_step_table(v, block_lengths) -> TypeGuard[dict]:
    """Whether v is a table of auto's step times on an engine of these block lengths:
    {choice name: {batch size: seconds}} (decoding/step_times.py)."""
    return _is_dict(v, _is_seconds_by_size) and set(v) <= _timed_choices(block_lengths)


def step_table_expected(block_lengths) -> str:
    return f"{{choice: {{batch size: seconds > 0}}}} for {', '.join(sorted(_timed_choices(block_lengths)))}"


def _timed_choices(block_lengths) -> set[str]:
    """The names of auto's choices on an engine of these block lengths: what a step table may time."""
    return {choice_name(c) for c in choices(tuple(block_lengths))}


_MISSING = object()


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_positive(v) -> bool:
    return type(v) in (int, float) and 0 < v < math.inf


def _is_seconds_by_size(v) -> bool:
    return _is_dict(v, _is_positive) and all(k.isdigit() and int(k) >= 1 for k in v)


def _is_count(v) -> bool:
    return type(v) is int and v >= 1  # not a bool


def _is_token(v) -> bool:
    return type(v) is int and v >= 0


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _is_dict(v: object, value_ok: Callable[[object], bool] = lambda x: True) -> TypeGuard[dict[str, Any]]:
    return isinstance(v, dict) and all(isinstance(k, str) and value_ok(x) for k, x in v.items())


def _is_list(v: object, item_ok: Callable[[object], bool]) -> TypeGuard[list[Any]]:
    return isinstance(v, list) and all(item_ok(x) for x in v)


def _is_blocked_source(v) -> bool:
    """[fqn of a fused GEMM matrix, block width] (torch_backend.blocked_sources)."""
    return isinstance(v, list) and len(v) == 2 and _is_str(v[0]) and _is_count(v[1])


def _lies_under(path: Path, root: Path) -> bool:
    """Whether path, with every symlink and '..' resolved, is inside root (an absolute path replaces it)."""
    try:
        return path.resolve().is_relative_to(root) and path.resolve() != root
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
