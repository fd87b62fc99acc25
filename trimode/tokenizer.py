"""The checkpoint's Hugging Face tokenizer.json, read with `tokenizers` (no remote code)."""

from __future__ import annotations

from pathlib import Path

from trimode.config import ModelSpec
from trimode.errors import CheckpointError, InputError


class Tokenizer:
    def __init__(self, checkpoint_dir: Path, spec: ModelSpec):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(checkpoint_dir) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{checkpoint_dir}: no tokenizer.json (the tokenizer is part of the checkpoint)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{path}: cannot read the tokenizer ({e})") from None
        if self._tok.get_vocab_size() > spec.vocab_size:
            raise CheckpointError(f"{path}: {self._tok.get_vocab_size()} tokens do not fit "
                                  f"vocab_size={spec.vocab_size} of config.json")
        self.bos_token_id = spec.bos_token_id

    def encode(self, text: str) -> list[int]:
        if not text:
            raise InputError("the prompt is empty")
        ids = self.encode_plain(text)
        if self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Tokens of text as it is: no BOS, empty text allowed (corpora, evaluation)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch_plain(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
