"""Calibration text: a user's file or folder, or the built-in set (standard-library sources)."""

from __future__ import annotations

from pathlib import Path

import torch

from trimode.config import ModelSpec
from trimode.errors import InputError
from trimode.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".c", ".h", ".js", ".html"}
BUILTIN_NUM_FILES = 64


def read_calibration_texts(path: Path | None) -> tuple[list[str], str]:
    """-> (texts, a description of the source). Raises InputError for a missing, empty or non-UTF-8 source."""
    from trimode.training.corpus import read_texts, split_files

    if path is None:
        train_files = split_files()[0]
        step = max(1, len(train_files) // BUILTIN_NUM_FILES)  # spread over the library, deterministic
        return read_texts(train_files[::step][:BUILTIN_NUM_FILES]), "built-in: Python standard library sources"
    path = Path(path)
    if not path.exists():
        raise InputError(f"--calib-data {path}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    texts = [t for t in read_texts(files, "--calib-data") if t.strip()]
    if not texts:
        raise InputError(
            f"--calib-data {path}: no text to calibrate on (empty, or no {'/'.join(sorted(TEXT_SUFFIXES))} files)"
        )
    return texts, f"{path} ({len(texts)} file{'s' * (len(texts) > 1)})"


def calibration_windows(
    texts: list[str], tokenizer: Tokenizer, spec: ModelSpec, num_samples: int, seq_len: int
) -> torch.Tensor:
    """[n, seq_len] token windows spread evenly over the concatenated texts (n <= num_samples)."""
    from trimode.training.corpus import document_stream

    stream = document_stream(tokenizer.encode_batch_plain(texts), spec.bos_token_id, spec.eos_token_ids[0])
    if len(stream) < seq_len:
        raise InputError(f"calibration text has {len(stream)} tokens, fewer than --calib-seq-len {seq_len}")
    num = min(num_samples, len(stream) // seq_len)
    stride = (len(stream) - seq_len) // max(1, num - 1) if num > 1 else 0
    return torch.stack([stream[i * stride : i * stride + seq_len] for i in range(num)])
