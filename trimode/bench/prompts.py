"""The prompt set of a bench: the user's file, or the held-out prompts `trimode eval` uses.

A file holds one prompt per line (blank lines skipped); a `.jsonl` file holds one JSON value per
line, a string or an object with a "prompt" string, so prompts may contain newlines. Prompts are
text: every target tokenizes them itself (a server does it in its preprocessing model).
"""

from __future__ import annotations

import json
from pathlib import Path

from trimode.bench.targets import BenchError


def read_prompts(path: Path) -> list[str]:
    where = f"--prompts {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchError(f"{where}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise BenchError(f"{where}: cannot read it ({e.strerror or e})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if Path(path).suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        value = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(value, str) or not value:
            raise BenchError(
                f'{where} line {number}: expected a JSON string or an object with a non-empty "prompt" string'
            )
        prompts.append(value)
    if not prompts:
        raise BenchError(
            f'{where}: holds no prompts (one per line; .jsonl: one JSON string or {{"prompt": ...}} per line)'
        )
    return prompts


def held_out_prompts(checkpoint_dir: Path, num_prompts: int | None = None, prompt_len: int | None = None) -> list[str]:
    """The held-out windows `trimode eval` generates from (EvalSettings' number and length, in the
    checkpoint's tokens), as text."""
    from trimode.checkpoint import load_checkpoint
    from trimode.evaluate import EvalSettings, held_out_stream
    from trimode.evaluate import held_out_prompts as windows

    ck = load_checkpoint(checkpoint_dir)
    defaults = EvalSettings()
    ids = windows(held_out_stream(ck), num_prompts or defaults.num_prompts, prompt_len or defaults.prompt_len)
    return [ck.tokenizer.decode(w) for w in ids]
