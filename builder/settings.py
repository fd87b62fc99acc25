"""Build settings: what `trimode build` compiles, validated once (design.md style 7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from trimode.config import ModelSpec
from trimode.errors import InputError
from trimode.kv_cache import KVCache, blocks_per_seq, parse_memory

BACKENDS = ("torch", "onnx", "tensorrt")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class BuildSettings:
    backend: str = "torch"
    max_batch_size: int = 8  # sequences in flight (the pool's slots, Triton's max_batch_size)
    max_seq_len: int = 1024  # prompt + generated tokens (+ one block) per sequence
    max_input_len: int = 256  # the prefill chunk: longer prompts are prefilled in chunks
    block_lengths: tuple[int, ...] = ()  # () = the checkpoint's block_size
    device: str = "cpu"
    onnx_only: bool = False  # tensorrt: export and check the ONNX, stop before TensorRT
    kv_block_size: int = 16  # positions per KV block (max_seq_len or more: one dense block per sequence)
    kv_cache_memory: str | None = None  # "2GiB", or "0.9" of free device memory; None: max_batch_size sequences
    num_kv_blocks: int | None = None  # the pool's blocks: resolved from kv_cache_memory at build (kv_pool)

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, "backend", " | ".join(BACKENDS), self.backend)
        _check(self.device in DEVICES, "device", " | ".join(DEVICES), self.device)
        for field in ("max_batch_size", "max_seq_len", "max_input_len", "kv_block_size"):
            value = getattr(self, field)
            _check(isinstance(value, int) and value >= 1, field.replace("_", "-"), "an integer >= 1", value)
        _check(
            all(isinstance(L, int) and L >= 1 for L in self.block_lengths),
            "block-lengths",
            "integers >= 1",
            ",".join(map(str, self.block_lengths)),
        )
        _check(
            self.max_input_len <= self.max_seq_len,
            "max-input-len",
            f"at most --max-seq-len ({self.max_seq_len})",
            self.max_input_len,
        )
        _check(
            not self.block_lengths or max(self.block_lengths) < self.max_seq_len,
            "block-lengths",
            f"below --max-seq-len ({self.max_seq_len})",
            ",".join(map(str, self.block_lengths)),
        )
        # a diffusion refresh runs on the prefill program (program.program_for)
        _check(
            not self.block_lengths or max(self.block_lengths) <= self.max_input_len,
            "block-lengths",
            f"at most --max-input-len ({self.max_input_len}): a refresh pass runs as a prefill chunk",
            ",".join(map(str, self.block_lengths)),
        )
        _check(
            not self.onnx_only or self.backend == "tensorrt", "onnx-only", "used with --backend tensorrt", self.backend
        )
        if self.kv_cache_memory is not None:
            try:
                parse_memory(self.kv_cache_memory)
            except InputError as e:
                raise InputError(f"--kv-cache-memory: {e}") from None
        _check(
            self.num_kv_blocks is None
            or (type(self.num_kv_blocks) is int and self.num_kv_blocks >= self.blocks_per_seq),
            "kv-cache-memory",
            f"room for at least the {self.blocks_per_seq} blocks of one max_seq_len sequence",
            self.num_kv_blocks,
        )

    @property
    def block_size(self) -> int:
        """The pool's block size: kv_block_size, at most max_seq_len (a larger block is one dense slot)."""
        return min(self.kv_block_size, self.max_seq_len)

    @property
    def blocks_per_seq(self) -> int:
        return blocks_per_seq(self.max_seq_len, self.block_size)

    @property
    def pool_blocks(self) -> int:
        """num_kv_blocks, or enough for max_batch_size sequences of max_seq_len (the null block not counted)."""
        return self.num_kv_blocks or self.max_batch_size * self.blocks_per_seq

    def new_pool(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        """The pool the engine's runner allocates (decoding EngineConfig of these settings): what a
        program is traced and exported over."""
        return KVCache.allocate(
            spec, self.max_batch_size, self.max_seq_len, dtype, device, self.block_size, self.pool_blocks
        )

    def resolved(self, block_size: int, num_kv_blocks: int | None = None) -> "BuildSettings":
        """The checkpoint's block_size when no block length was given; num_kv_blocks (build_engine's
        reading of kv_cache_memory), or enough for max_batch_size sequences."""
        lengths = tuple(sorted(set(self.block_lengths or (block_size,))))
        blocks = num_kv_blocks or self.pool_blocks
        return BuildSettings(**{**asdict(self), "block_lengths": lengths, "num_kv_blocks": blocks})


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise InputError(f"--{name}: expected {expected}, got {value!r}")
