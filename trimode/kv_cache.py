"""The KV pool: one K and one V tensor per layer, `num_slots` rows x `max_len` positions, and the
committed length of each row (design.md: preallocated, no growing Python lists). Per-layer tensors
are what a compiled program can take as inputs and write in place (../shared/notes/stack.md).
A pool the device cannot hold is refused with its size before any of it is allocated."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trimode.config import ModelSpec
from trimode.errors import InputError


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [num_slots, num_kv_heads, max_len, head_dim]: model dtype or float8 codes
    v: list[torch.Tensor]  # same
    lengths: torch.Tensor  # [num_slots] int64: committed tokens per row (spec §4 KV rule)

    @classmethod
    def allocate(
        cls, spec: ModelSpec, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> "KVCache":
        check_pool_fits(spec, num_slots, max_len, dtype, device)
        shape = (num_slots, spec.num_key_value_heads, max_len, spec.head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_hidden_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_hidden_layers)],
            torch.zeros(num_slots, dtype=torch.long, device=device),
        )

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as views: a pass over them writes the pool, with no gather."""
        return KVCache([k[start:stop] for k in self.k], [v[start:stop] for v in self.v], self.lengths[start:stop])

    def advance(self, rows: torch.Tensor, counts: torch.Tensor | int) -> None:
        """Commit `counts` more tokens for `rows`: K/V written past a length is scratch until then."""
        self.lengths[rows] += counts

    def crop(self, rows: torch.Tensor, new_lengths: torch.Tensor) -> None:
        self.lengths[rows] = new_lengths


def check_pool_fits(
    spec: ModelSpec, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Refuse a pool larger than the memory the device has left: allocating it would end in an
    allocator traceback, or (the pool is zeroed, so every page is touched) in the OOM killer."""
    device = torch.device(device)
    size = dtype.itemsize
    need = spec.num_hidden_layers * 2 * num_slots * max_len * spec.num_key_value_heads * spec.head_dim * size
    room, source = available_memory(device)
    if need > room:
        raise InputError(
            f"the KV pool of max_batch_size {num_slots} x max_seq_len {max_len} "
            f"({spec.num_hidden_layers} layers x K,V x {spec.num_key_value_heads} kv heads x head_dim "
            f"{spec.head_dim} x {size} bytes) needs {_size(need)}, and {device.type} has {_size(room)} "
            f"({source}); lower max_batch_size or max_seq_len (an engine's are those of its "
            f"`trimode build`)"
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
