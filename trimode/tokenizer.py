"""The checkpoint's Hugging Face tokenizer.json, read with `tokenizers` (no remote code), and the
incremental detokenizer that turns a growing token list into final text for streaming."""

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
            raise CheckpointError(
                f"{path}: {self._tok.get_vocab_size()} tokens do not fit vocab_size={spec.vocab_size} of config.json"
            )
        self.bos_token_id = spec.bos_token_id

    def encode(self, text: str) -> list[int]:
        if not text:
            raise InputError("the prompt is empty")
        check_text(text, "the prompt")
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


def check_text(text: str, what: str) -> None:
    """Text from the command line that is not valid UTF-8 arrives with lone surrogates: refuse it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 text (invalid bytes at character {e.start})") from None


class IncrementalDetokenizer:
    """Streams the text of a growing token sequence: `push` returns only text that is final, so
    everything pushed, then `flush`, concatenates to `decode(all tokens)` exactly.

    A character whose bytes span several tokens decodes to U+FFFD until its last byte arrives; text
    ending in U+FFFD is therefore held back until a later token completes it (or `flush` emits it
    as it stands, when the sequence ends there). Only a short window of tokens is decoded per push:
    text is decoded from `_start` (a token boundary that ended on a whole character) and what the
    window already produced (`_emitted` characters) is cut off, which also keeps decoders that treat
    the first token specially (a stripped leading space) consistent with the full decode.
    """

    REPLACEMENT = "\ufffd"

    def __init__(self, decode):
        """decode: token ids -> text (e.g. `Tokenizer.decode`); nothing else is needed."""
        self._decode = decode
        self._ids: list[int] = []
        self._start = 0  # first token of the window
        self._emitted = 0  # characters of decode(ids[_start:]) already returned

    def push(self, token_ids) -> str:
        """Append newly committed tokens; -> the text that became final (possibly "")."""
        self._ids.extend(int(t) for t in token_ids)
        text = self._decode(self._ids[self._start :])
        end = len(text)
        while end > self._emitted and text[end - 1] == self.REPLACEMENT:
            end -= 1  # possibly an incomplete character: wait for its remaining bytes
        if end <= self._emitted:
            return ""
        new = text[self._emitted : end]
        if end == len(text):  # a clean boundary: restart the window one token back
            keep = self._ids[-1:]
            self._start = len(self._ids) - len(keep)
            self._emitted = len(self._decode(keep))
        else:
            self._emitted = end
        return new

    def flush(self) -> str:
        """The rest, at the end of the sequence (held-back replacement characters included)."""
        text = self._decode(self._ids[self._start :])
        rest, self._emitted = text[self._emitted :], len(text)
        return rest
