"""The backends' pool contract on a paged pool: one pass of a backend over the engine's pool, its
slots' blocks shuffled (non-contiguous, out of order, entries past a slot's need on the null block),
against the eager model on a dense pool with the same K/V (test_builder.py, test_builder_onnx.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.kv_cache import KVCache
from trimode.plugins.reference import gather_blocks


@dataclass
class PassResult:
    got: torch.Tensor  # the backend's logits
    expected: torch.Tensor  # the eager model's, on the dense pool
    paged: KVCache  # after the backend's pass
    dense: KVCache  # after the eager pass
    initial: list[torch.Tensor]  # the paged pool's tensors before the pass
    written: torch.Tensor  # [num_blocks + 1, block_size] bool: the (block, offset) the pass had to write


def random_fill(t: torch.Tensor, g: torch.Generator) -> None:
    if t.dtype == torch.float8_e4m3fn:  # codes of small integers: exact in e4m3
        t.copy_(torch.randint(-100, 100, t.shape, generator=g).to(torch.float32).to(t.dtype))
    else:
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))


def twin_pools(
    model, num_slots: int, max_seq_len: int, block_size: int, num_blocks: int | None, lengths: dict, seed: int
):
    """-> (dense, paged): every pool tensor random; each slot of `lengths` ({slot: committed length})
    gets shuffled blocks for all of max_seq_len in the paged pool, holding the dense pool's K/V."""
    g = torch.Generator().manual_seed(seed)
    dense = model.new_cache(num_slots, max_seq_len)
    paged = model.new_cache(num_slots, max_seq_len, block_size, num_blocks)
    P, T = paged.block_size, paged.block_tables.shape[1]
    perm = torch.randperm(paged.num_blocks, generator=g)
    assert len(lengths) * T <= paged.num_blocks
    for t in dense.k + dense.v + paged.k + paged.v:
        random_fill(t, g)
    for i, slot in enumerate(lengths):
        paged.block_tables[slot] = perm[i * T : (i + 1) * T]
        for j, block in enumerate(perm[i * T : (i + 1) * T].tolist()):
            width = min(P, max_seq_len - j * P)
            for d, p in zip(dense.k + dense.v, paged.k + paged.v):
                p[block, :, :width] = d[slot, :, j * P : j * P + width]
        dense.lengths[slot] = paged.lengths[slot] = lengths[slot]
    assert T == 1 or not torch.equal(
        paged.block_tables[list(lengths)].sort(1).values, paged.block_tables[list(lengths)]
    )
    return dense, paged


def run_pass(model, backend, kind, tokens, slots, dense: KVCache, paged: KVCache) -> PassResult:
    """One pass of `backend` over the paged pool and of the eager model over the dense one."""
    L = tokens.shape[1]
    lengths = [int(paged.lengths[s]) for s in slots]
    logit_index = torch.full((len(slots),), L - 1) if kind.last_logit_only else None
    initial = [t.clone() for t in paged.k + paged.v]
    written = torch.zeros(paged.num_blocks + 1, paged.block_size, dtype=torch.bool)
    for s, n in zip(slots, lengths):
        positions = torch.arange(n, n + L)
        written[paged.block_tables[s, positions // paged.block_size], positions % paged.block_size] = True
    with torch.no_grad():
        expected = model(tokens, dense, kind, torch.tensor(slots), logit_index)
        got = backend(kind, tokens, paged, slots, lengths, logit_index)
    got = got if isinstance(got, torch.Tensor) else got.logits
    return PassResult(got, expected, paged, dense, initial, written)


def bits(t: torch.Tensor) -> torch.Tensor:
    """float8 codes as bytes (so equality works on them), anything else as it is."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def check_pool_writes(r: PassResult, slots: list[int], length: int, atol) -> None:
    """The KV rule on the paged pool: every (block, offset) outside the chunk positions untouched; the
    chunk's K/V, read back through the slots' tables, equal to what the eager model wrote into the
    dense pool (atol(expected) -> the bound)."""
    lengths = [int(r.paged.lengths[s]) for s in slots]
    for a, before, b in zip(r.paged.k + r.paged.v, r.initial, r.dense.k + r.dense.v):
        a_, before_ = bits(a).transpose(1, 2), bits(before).transpose(1, 2)  # [N + 1, P, Hkv, D]
        assert torch.equal(a_[~r.written], before_[~r.written])
        assert not torch.equal(a_[r.written], before_[r.written])
        for s, n in zip(slots, lengths):
            got = gather_blocks(a, r.paged.block_tables[s : s + 1], n + length)[0, :, n:].float()
            expected = b[s, :, n : n + length].float()
            torch.testing.assert_close(got, expected, atol=atol(expected), rtol=0)
