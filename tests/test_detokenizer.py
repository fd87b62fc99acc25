"""IncrementalDetokenizer: the streamed text is the final text, byte for byte, however the tokens
arrive and wherever a multi-byte character is split; `generate` streams through it."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimode.cli import EMBEDDED_CHECKPOINT, main
from trimode.config import ModelSpec
from trimode.tokenizer import IncrementalDetokenizer, Tokenizer

REPLACEMENT = "\ufffd"


def _tokenizer(d) -> Tokenizer:
    return Tokenizer(d, ModelSpec.from_file(d / "config.json"))


@pytest.fixture(scope="module", params=["tiny", "trained"])
def tokenizer(request, tiny_dir):
    return _tokenizer(tiny_dir if request.param == "tiny" else EMBEDDED_CHECKPOINT)


def stream(tokenizer: Tokenizer, ids: list[int], cuts: list[int]) -> list[str]:
    """Push ids in chunks ending at the cut points, then flush; -> the pieces returned."""
    detok, pieces, start = IncrementalDetokenizer(tokenizer.decode), [], 0
    for end in [*sorted(set(cuts)), len(ids)]:
        pieces.append(detok.push(ids[start:end]))
        start = end
    return [*pieces, detok.flush()]


def _ids_and_cuts(vocab_size: int):
    return st.lists(st.integers(0, vocab_size - 1), max_size=40).flatmap(
        lambda ids: st.tuples(st.just(ids), st.lists(st.integers(0, len(ids)), max_size=len(ids)))
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_tokens_any_chunking_stream_the_final_text(tokenizer, data):
    ids, cuts = data.draw(_ids_and_cuts(tokenizer._tok.get_vocab_size()))
    pieces = stream(tokenizer, ids, cuts)
    final = tokenizer.decode(ids)
    assert "".join(pieces).encode() == final.encode()
    shown = ""
    for piece in pieces[:-1]:  # what push returns is final: always a prefix of the final text
        shown += piece
        assert final.startswith(shown)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]), max_size=30))
def test_multibyte_text_streams_without_replacement_characters(tokenizer, text):
    ids = tokenizer.encode_plain(text)
    pieces = stream(tokenizer, ids, list(range(len(ids))))  # one token at a time
    assert "".join(pieces) == tokenizer.decode(ids)
    if REPLACEMENT not in text and tokenizer.decode(ids) == text:
        assert all(REPLACEMENT not in p for p in pieces)  # nothing is printed before it is whole


@pytest.mark.parametrize("char", ["€", "𝄞", "日"])
def test_a_split_character_is_held_back_until_complete(tiny_dir, char):
    tok = _tokenizer(tiny_dir)  # trained on ASCII: a non-ASCII character is one token per UTF-8 byte
    ids = tok.encode_plain(char)
    assert len(ids) == len(char.encode()) and REPLACEMENT in tok.decode(ids[:1])
    detok = IncrementalDetokenizer(tok.decode)
    assert [detok.push([t]) for t in ids] == [""] * (len(ids) - 1) + [char]
    assert detok.flush() == ""
    unfinished = IncrementalDetokenizer(tok.decode)  # the sequence ends inside the character
    assert unfinished.push(ids[:-1]) == "" and unfinished.flush() == tok.decode(ids[:-1])


PROMPTS = ["café au lait", "naïve → résumé", "日本語のテキスト", "emoji 😀 and ∑ math", "Ωmega ß", "def f(x):  # ü"]


def test_generate_streams_exactly_the_final_text(runner, tiny_dir):
    """Random seeds and multi-byte prompts, sampled at a high temperature so byte tokens come out
    split: the streamed stdout is the prompt, then exactly the text of the --json result."""
    ck, tok = tiny_dir, _tokenizer(tiny_dir)
    rng = random.Random(1234)
    num_split = 0
    for _ in range(6):
        seed, prompt, mode = rng.randrange(2**63), rng.choice(PROMPTS), rng.choice(["ar", "diffusion", "self-spec"])
        args = [
            "generate",
            "--checkpoint",
            str(ck),
            "--mode",
            mode,
            "--temperature",
            "1.5",
            "--seed",
            str(seed),
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--block-length",
            "4",
            prompt,
        ]
        streamed = runner.invoke(main, args)
        final = runner.invoke(main, [*args, "--json"])
        assert streamed.exit_code == 0 and final.exit_code == 0, streamed.output + final.output
        result = json.loads(final.stdout)["results"][0]
        assert streamed.stdout == prompt + result["text"] + "\n"
        tokens = result["tokens"]
        # decoding each prefix, as generate used to, shows text that the final text does not start with
        num_split += any(not result["text"].startswith(tok.decode(tokens[:k])) for k in range(1, len(tokens)))
    assert num_split > 0  # so these runs are ones the old streaming printed wrongly
