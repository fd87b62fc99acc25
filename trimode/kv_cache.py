"""The KV pool: fixed-size blocks of K and V per layer, a block table per slot, and the committed
length of each slot (design.md: preallocated, no growing Python lists). Per-layer tensors are what a
compiled program can take as inputs and write in place (../shared/notes/stack.md).

Position p of the sequence in slot s lives at block `block_tables[s, p // block_size]`, offset
`p % block_size`. A dense pool is the case block_size = max_len: one block per slot, block i for slot
i (what `allocate` gives by default). The last block is the null block: table entries of positions a
slot holds no block for point there, so a padded chunk's scratch lands there and is never read as
committed K/V. A pool the device cannot hold is refused with its size before any of it is allocated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trimode.config import ModelSpec
from trimode.errors import InputError
from trimode.transfer import to_device


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [num_blocks + 1, num_kv_heads, block_size, head_dim]: model dtype or float8 codes
    v: list[torch.Tensor]  # same; block num_blocks is the null block
    lengths: torch.Tensor  # [num_slots] int64: committed tokens per slot (spec §4 KV rule)
    block_tables: torch.Tensor  # [num_slots, max_blocks] int64: each slot's blocks; null_block where it has none

    @classmethod
    def allocate(
        cls,
        spec: ModelSpec,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        block_size: int | None = None,
        num_blocks: int | None = None,
    ) -> "KVCache":
        """block_size None: dense, one block of max_len per slot, slot i in block i. Otherwise
        num_blocks blocks (default: enough for every slot at max_len) and empty tables."""
        dense = block_size is None or block_size >= max_len
        block_size = max_len if block_size is None else min(block_size, max_len)
        num_blocks = num_blocks or num_slots * blocks_per_seq(max_len, block_size)
        check_pool_fits(spec, num_blocks, block_size, dtype, device)
        shape = (num_blocks + 1, spec.num_key_value_heads, block_size, spec.head_dim)
        tables = torch.full((num_slots, blocks_per_seq(max_len, block_size)), num_blocks, dtype=torch.long)
        if dense:
            tables[:, 0] = torch.arange(num_slots).clamp(max=num_blocks)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_hidden_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_hidden_layers)],
            torch.zeros(num_slots, dtype=torch.long, device=device),
            tables.to(device),
        )

    @property
    def num_slots(self) -> int:
        return self.block_tables.shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_blocks(self) -> int:
        """Blocks a sequence can hold (the null block not counted)."""
        return self.k[0].shape[0] - 1

    @property
    def null_block(self) -> int:
        return self.num_blocks

    @property
    def max_len(self) -> int:
        """Positions one slot's table can address."""
        return self.block_tables.shape[1] * self.block_size

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def slot_tables(self, slots: list[int]) -> torch.Tensor:
        """[b, T] the block tables of `slots`: a view for a contiguous run of slots, else a gather."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            return self.block_tables[first : first + len(slots)]
        return self.block_tables[to_device(slots, self.block_tables.device)]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Slots start..stop-1: the same blocks, those slots' tables and lengths (views)."""
        return KVCache(self.k, self.v, self.lengths[start:stop], self.block_tables[start:stop])

    def advance(self, rows: torch.Tensor, counts: torch.Tensor | int) -> None:
        """Commit `counts` more tokens for `rows`: K/V written past a length is scratch until then."""
        self.lengths[rows] += counts

    def crop(self, rows: torch.Tensor, new_lengths: torch.Tensor) -> None:
        self.lengths[rows] = new_lengths


def position_index(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> tuple:
    """Where positions [b, L] of the rows with block tables [b, T] live: (blocks [b, L], :, offsets
    [b, L]), so a layer's pool[index] is their K or V, [b, L, Hkv, D]. Traceable (no host sync)."""
    return tables.gather(1, positions // block_size), slice(None), positions % block_size


def span_index(tables: torch.Tensor, keys: torch.Tensor, num_kv_heads: int, block_size: int) -> tuple:
    """Where the same positions keys [S] of every row live, as one gather: a layer's pool[index] is
    [b, Hkv, S, D]. Traceable (no host sync, no slice of data-dependent size)."""
    heads = torch.arange(num_kv_heads, device=keys.device)[None, :, None]
    return tables[:, keys // block_size][:, None, :], heads, (keys % block_size)[None, None, :]


def blocks_per_seq(max_len: int, block_size: int) -> int:
    return -(-max_len // block_size)


def block_bytes(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: every layer's K and V for block_size positions."""
    return spec.num_hidden_layers * 2 * block_size * spec.num_key_value_heads * spec.head_dim * dtype.itemsize


_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_memory(text: str) -> tuple[int | None, float | None]:
    """A KV cache budget as the CLI takes it: bytes ("2GiB", "512MiB", "1000000") -> (bytes, None),
    or a fraction of the memory the device has free ("0.5") -> (None, 0.5). InputError otherwise."""
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise InputError(f"KV cache memory {text!r}: expected bytes (e.g. 2GiB, 512MiB) or a fraction in (0, 1]")
    if unit == "" and "." in raw:
        if value > 1:
            raise InputError(f"KV cache memory {text!r}: a fraction of free memory lies in (0, 1]; bytes need no point")
        return None, value
    if unit == "" and value != int(value):
        raise InputError(f"KV cache memory {text!r}: a byte count is a whole number")
    return int(value * _UNITS[unit]), None


def blocks_for_memory(
    spec: ModelSpec,
    dtype: torch.dtype,
    block_size: int,
    max_seq_len: int,
    memory: str,
    device: torch.device | str = "cpu",
) -> int:
    """The number of blocks (null block excluded) a budget holds. Refused, with the numbers, when it
    cannot hold one sequence of max_seq_len: such a pool could never run its longest request."""
    asked, fraction = parse_memory(memory)
    if fraction is not None:
        room, source = available_memory(torch.device(device))
        num_bytes, what = int(room * fraction), f"{fraction:g} of {_size(room)} ({source})"
    else:
        assert asked is not None  # parse_memory gives one of the two
        num_bytes, what = asked, _size(asked)
    per_block = block_bytes(spec, block_size, dtype)
    num_blocks = num_bytes // per_block - 1  # the null block comes out of the budget too
    need = blocks_per_seq(max_seq_len, block_size)
    if num_blocks < need:
        raise InputError(
            f"KV cache memory {what} holds {max(num_blocks, 0)} blocks of {block_size} positions "
            f"({_size(per_block)} each, plus one null block); one sequence of max_seq_len {max_seq_len} "
            f"needs {need} ({_size((need + 1) * per_block)}): raise the memory or lower max_seq_len"
        )
    return num_blocks


def check_pool_fits(
    spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Refuse a pool larger than the memory the device has left: allocating it would end in an
    allocator traceback, or (the pool is zeroed, so every page is touched) in the OOM killer."""
    device = torch.device(device)
    need = (num_blocks + 1) * block_bytes(spec, block_size, dtype)
    room, source = available_memory(device)
    if need > room:
        raise InputError(
            f"the KV pool of {num_blocks} blocks x {block_size} positions "
            f"({spec.num_hidden_layers} layers x K,V x {spec.num_key_value_heads} kv heads x head_dim "
            f"{spec.head_dim} x {dtype.itemsize} bytes) needs {_size(need)}, and {device.type} has {_size(room)} "
            f"({source}); lower max_batch_size, max_seq_len or the KV cache memory (an engine's are "
            f"those of its `trimode build`)"
        )


def available_memory(device: torch.device) -> tuple[int, str]:
    """-> (bytes a new allocation on device can take, where that number comes from)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # torch's caching allocator holds freed blocks it would hand out again: free to us, not to the driver
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {device}"
    found = [*_cgroup_room()]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        found.append((int(meminfo["MemAvailable"].split()[0]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, KeyError, ValueError):
        try:
            found.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available physical pages"))
        except (OSError, ValueError):
            pass
    return min(found, default=(1 << 62, "no limit known"))


_PROC_CGROUP = Path("/proc/self/cgroup")  # per hierarchy: "0::/path" (v2), "4:memory:/path" (v1)
# cgroup version: (mount point, limit file, usage file, the reclaimable page cache's key in memory.stat)
_CGROUPS = {
    2: (Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"),
    1: (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def _cgroup_room() -> list[tuple[int, str]]:
    """What the memory limit of this process's cgroup and of each one above it leaves: a container's
    limit, which MemAvailable does not see. Usage counts the page cache; its inactive part is what the
    kernel reclaims before it kills, so it counts as room (the working set, as kubelet computes it)."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    room = []
    for _, controllers, path in (line.split(":", 2) for line in lines if line.count(":") >= 2):
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        mount, limit_file, usage_file, cache_key = _CGROUPS[version]
        here = mount / path.lstrip("/")
        for folder in [here, *here.parents][: len(here.relative_to(mount).parts) + 1]:
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit == "max":  # cgroup v2: no limit at this level
                    continue
                usage = int((folder / usage_file).read_text())
                stat = dict(row.split() for row in (folder / "memory.stat").read_text().splitlines())
                room.append((int(limit) - usage + int(stat.get(cache_key, 0)), f"the cgroup limit of {folder}"))
            except (OSError, ValueError):
                continue
    return room


def _size(num_bytes: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes >= 1 << shift:
            return f"{num_bytes / (1 << shift):.1f} {unit}"
    return f"{num_bytes} bytes"
