"""The KV pool: one K and one V tensor per layer, `num_slots` rows x `max_len` positions, and the
committed length of each row (design.md: preallocated, no growing Python lists). Per-layer tensors
are what a compiled program can take as inputs and write in place (../shared/notes/stack.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.config import ModelSpec


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [num_slots, num_kv_heads, max_len, head_dim]: model dtype or float8 codes
    v: list[torch.Tensor]  # same
    lengths: torch.Tensor  # [num_slots] int64: committed tokens per row (spec §4 KV rule)

    @classmethod
    def allocate(cls, spec: ModelSpec, num_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> "KVCache":
        shape = (num_slots, spec.num_key_value_heads, max_len, spec.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_hidden_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_hidden_layers)],
                   torch.zeros(num_slots, dtype=torch.long, device=device))

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
