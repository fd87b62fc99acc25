"""Memory-mapped safetensors reading: tensors are views of the file, nothing is copied until used.

The safetensors layout is an 8-byte little-endian header size, a JSON header mapping each name to
{dtype, shape, data_offsets}, then the raw bytes. Pages are mapped copy-on-write, so an 8B
checkpoint costs no host memory until a tensor is touched (or moved to the GPU).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from trimode.errors import CheckpointError

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    base = 8 + size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = TensorInfo(path, entry["dtype"], tuple(entry["shape"]), base + begin, base + end)
    return out


class MappedFiles:
    """Keeps one copy-on-write mapping per file alive for as long as its tensors are."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        if info.dtype not in DTYPES:
            raise CheckpointError(f"{info.path}: unsupported tensor dtype {info.dtype}")
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
