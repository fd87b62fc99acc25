"""Memory-mapped safetensors reading: tensors are views of the file, nothing is copied until used.

The safetensors layout is an 8-byte little-endian header size, a JSON header mapping each name to
{dtype, shape, data_offsets}, then the raw bytes. Pages are mapped copy-on-write, so an 8B
checkpoint costs no host memory until a tensor is touched (or moved to the GPU).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from trimode.errors import CheckpointError

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's dtype, shape and absolute byte range, checked against each other and the file:
    a corrupt file is a CheckpointError naming the file (and the tensor), never a traceback later."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file ({file_size} bytes, shorter than the 8-byte header size)"
                )
            (size,) = struct.unpack("<Q", prefix)
            if not 2 <= size <= min(MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(
                    f"{path}: header size {size} does not fit the file ({file_size} bytes; at most {MAX_HEADER_BYTES})"
                )
            raw = f.read(size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: '__metadata__' must map names to strings")
    base, data_size = 8 + size, file_size - 8 - size
    out = {name: _entry(path, name, entry, base, data_size) for name, entry in header.items()}
    covered = 0  # the format's rule: the tensors tile the data section, in order, without gaps
    for info in sorted(out.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != base + covered:
            what = "overlaps another tensor" if info.begin < base + covered else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {_name_of(out, info)!r}: data_offsets {what}")
        covered = info.end - base
    if covered != data_size:
        raise CheckpointError(
            f"{path}: {data_size - covered} bytes after the last tensor's data "
            f"(the file is not what its header describes)"
        )
    return out


def _entry(path: Path, name: str, entry, base: int, data_size: int) -> TensorInfo:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {what}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"expected an object with exactly 'dtype', 'shape' and 'data_offsets', got {json.dumps(entry)[:80]}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape must be a list of integers >= 0, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"data_offsets must be two integers >= 0, got {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise bad(f"data_offsets {offsets} lie outside the {data_size} data bytes of the file")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise bad(f"{end - begin} bytes of data, but shape {shape} of {dtype} needs {expected}")
    return TensorInfo(path, dtype, tuple(shape), base + begin, base + end)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _name_of(infos: dict[str, TensorInfo], info: TensorInfo) -> str:
    return next(name for name, i in infos.items() if i is info)


class MappedFiles:
    """Keeps one copy-on-write mapping per file alive for as long as its tensors are."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        mm = self._maps.get(info.path)
        if mm is None:
            with open(info.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.path] = mm
        dtype = DTYPES[info.dtype]
        count = (info.end - info.begin) // dtype.itemsize
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=info.begin).view(info.shape)
