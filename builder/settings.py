"""Build settings: what `trimode build` compiles, validated once (design.md style 7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trimode.errors import InputError

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

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, "backend", " | ".join(BACKENDS), self.backend)
        _check(self.device in DEVICES, "device", " | ".join(DEVICES), self.device)
        for field in ("max_batch_size", "max_seq_len", "max_input_len"):
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

    def resolved(self, block_size: int) -> "BuildSettings":
        """The checkpoint's block_size when no block length was given."""
        lengths = tuple(sorted(set(self.block_lengths or (block_size,))))
        return BuildSettings(**{**asdict(self), "block_lengths": lengths})


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise InputError(f"--{name}: expected {expected}, got {value!r}")
