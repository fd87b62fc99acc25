"""Streamed text without state in postprocessing: each response carries its new tokens with a few
earlier ones in front, and the new text is what the new tokens add to the decode of those.

The engine model sends `output_ids = tokens[lo:end]` with `prefix_length = start - lo` (the tokens
already rendered), lo = start - WINDOW. Decoding from the same first token on both sides keeps
decoders that treat the first token specially (a stripped leading space) consistent, and text
ending in U+FFFD (a character whose bytes are still arriving) is held back until the final
response, as IncrementalDetokenizer does. So the texts of all responses concatenate to the decode
of all tokens, which postprocessing never sees at once.
"""

from __future__ import annotations

from collections.abc import Callable

WINDOW = 8  # > the 4 bytes of the longest UTF-8 character, a byte per token at worst
REPLACEMENT = "\ufffd"


def window(tokens: list[int], start: int, end: int) -> tuple[list[int], int]:
    """tokens[start:end] are new -> (the ids to send, how many of them lead in and were rendered)."""
    lo = max(0, start - WINDOW)
    return tokens[lo:end], start - lo


def new_text(decode: Callable[[list[int]], str], ids: list[int], prefix_length: int, is_final: bool) -> str:
    """The text that ids[prefix_length:] add after ids[:prefix_length] (module doc)."""
    full = decode(ids)
    if not is_final:
        full = full.rstrip(REPLACEMENT)
    before = decode(ids[:prefix_length]).rstrip(REPLACEMENT) if prefix_length else ""
    return full[len(before) :]
