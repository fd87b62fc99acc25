"""The KV pool's blocks: who holds which, and the prefix cache (nano-vllm's BlockManager).

Each sequence holds a list of blocks (its block table: position p is in blocks[p // block_size]).
A block is full when every one of its positions holds committed K/V; a full block is keyed by a
hash chained over the tokens of every block up to it, so equal prefixes give equal keys. Every
committed K/V comes from a causal pass over the committed tokens (prefill, decode, verify,
refresh: spec §4), so it depends on nothing but the tokens before it: a new sequence whose prompt
starts with a cached prefix shares those blocks read-only instead of computing them. Scratch K/V of
block passes (denoise, draft) and rejected drafts lies past a sequence's length: never in a full
block, never cached.

Free blocks wait in LRU order: blocks with no key first (nothing to lose), then cached blocks from
the least recently freed; allocating takes from the front, evicting a cached block's key. A freed
cached block stays findable until then, so a preempted sequence resumes mostly from cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from trimode.errors import InputError


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prefill tokens looked up in the prefix cache
    hit_tokens: int = 0  # of those, found (not computed)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class BlockState:
    """What one sequence holds."""

    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # the chained keys of its first len(keys) (full) blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> the block that holds it
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front: next to take
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def key(self, previous: bytes | None, tokens: list[int]) -> bytes:
        digest = hashlib.blake2b(previous or b"", digest_size=16)
        digest.update(b"".join(t.to_bytes(4, "little") for t in tokens))
        return digest.digest()

    def cached_prefix(self, tokens: list[int], max_blocks: int) -> list[int]:
        """The cached blocks holding the longest run of tokens' first full blocks (at most max_blocks)."""
        if not self.prefix_caching:
            return []
        found, key, size = [], None, self.block_size
        for i in range(min(max_blocks, len(tokens) // size)):
            key = self.key(key, tokens[i * size : (i + 1) * size])
            block = self.cached.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def admit(self, state: BlockState, tokens: list[int], num_positions: int, computed_at_least: int) -> int | None:
        """Blocks for a sequence that will prefill `tokens` and then write up to num_positions:
        its cached prefix shared, the rest new. computed_at_least: tokens at the end that must be
        computed even if cached (1: the last prompt token's logit gives the first new token).
        -> the number of tokens found in the cache, or None (state untouched) if too few blocks are free."""
        shared = self.cached_prefix(tokens, (len(tokens) - computed_at_least) // self.block_size)
        num_new = self.blocks_for(num_positions) - len(shared)
        if num_new + sum(self.ref_counts[b] == 0 for b in shared) > len(self.free):
            return None
        for block in shared:
            self._hold(block)
        state.blocks = shared + [self._take() for _ in range(num_new)]
        state.keys = [key for b in shared if (key := self.block_keys[b]) is not None]  # every cached block has one
        self.stats.queried_tokens += len(tokens)
        self.stats.hit_tokens += len(shared) * self.block_size
        return len(shared) * self.block_size

    def grow(self, state: BlockState, num_positions: int) -> bool:
        """Add blocks until state covers num_positions; False (nothing added) if too few are free."""
        num_new = self.blocks_for(num_positions) - len(state.blocks)
        if num_new > len(self.free):
            return False
        state.blocks += [self._take() for _ in range(num_new)]
        return True

    def commit(self, state: BlockState, tokens: list[int], length: int) -> None:
        """Key the blocks that the first `length` committed tokens fill (tokens: at least those)."""
        size = self.block_size
        while len(state.keys) < length // size:
            i = len(state.keys)
            state.keys.append(self.key(state.keys[-1] if state.keys else None, tokens[i * size : (i + 1) * size]))
            block = state.blocks[i]
            if self.prefix_caching and self.block_keys[block] is None and state.keys[i] not in self.cached:
                self.block_keys[block], self.cached[state.keys[i]] = state.keys[i], block

    def release(self, state: BlockState) -> None:
        """Drop state's hold on its blocks, last first: a block nobody holds is free (still findable if keyed)."""
        for block in reversed(state.blocks):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released more often than held"
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.block_keys[block] is None:
                    self.free.move_to_end(block, last=False)  # nothing to keep: the next to take
        state.blocks, state.keys = [], []

    def _hold(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _take(self) -> int:
        if not self.free:
            raise InputError("the KV pool has no free block")  # callers check first: an internal error
        block, _ = self.free.popitem(last=False)
        key = self.block_keys[block]
        if key is not None:  # evict: its tokens are no longer found
            del self.cached[key]
            self.block_keys[block] = None
        self.ref_counts[block] = 1
        return block
