"""Preallocated KV cache with per-sequence lengths (design.md: no growing Python lists)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.config import ModelSpec


@dataclass
class KVCache:
    k: torch.Tensor        # [num_layers, B, num_kv_heads, max_len, head_dim]: model dtype or float8 codes
    v: torch.Tensor        # same
    lengths: torch.Tensor  # [B] int64: committed tokens per sequence (spec §4 KV rule)

    @classmethod
    def allocate(cls, spec: ModelSpec, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> "KVCache":
        shape = (spec.num_hidden_layers, batch_size, spec.num_key_value_heads, max_len, spec.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def advance(self, rows: torch.Tensor, counts: torch.Tensor | int) -> None:
        """Commit `counts` more tokens for `rows`: K/V written past a length is scratch until then."""
        self.lengths[rows] += counts

    def crop(self, rows: torch.Tensor, new_lengths: torch.Tensor) -> None:
        self.lengths[rows] = new_lengths
