"""The fixture's corpus: the Python standard library of the interpreter that runs it.

Real text that exists offline on every machine. Split by file; the held-out set is a fixed list of
modules present in Python 3.10 to 3.13, so held-out metrics reproduce on any machine.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from trimode.errors import InputError

HELD_OUT = (
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "csv.py",
    "fnmatch.py",
    "fractions.py",
    "glob.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "numbers.py",
    "pprint.py",
    "queue.py",
    "reprlib.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
)
# Test suites, vendored and generated code: not the language as people write it.
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "encodings",
    "pydoc_data",
}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, held-out) .py files under root, sorted by relative path."""
    root = Path(root or stdlib_dir())
    files = sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & _SKIP_DIRS)
    held = {root / h for h in HELD_OUT}
    missing = [str(h) for h in held if not h.is_file()]
    if missing:
        raise InputError(f"{root}: held-out modules missing: {', '.join(sorted(missing))}")
    return [p for p in files if p not in held], [root / h for h in HELD_OUT]


def read_texts(paths: list[Path], option: str = "") -> list[str]:
    """Each file's UTF-8 text. A file that is not UTF-8 (binary data, another encoding) is an
    InputError naming it (and the option it came from): replacement characters would train silently."""
    texts = []
    for p in paths:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{option} {p}: not UTF-8 text (a binary file, or another encoding)".lstrip()) from None
        except OSError as e:
            raise InputError(f"{option} {p}: cannot read ({e.strerror or e})".lstrip()) from None
    return texts


def document_stream(documents: list[list[int]], bos_token_id: int | None, eos_token_id: int) -> torch.Tensor:
    """Token lists as [bos] + tokens + [eos], concatenated: one long int64 stream."""
    bos = [] if bos_token_id is None else [bos_token_id]
    ids: list[int] = []
    for doc in documents:
        ids += [*bos, *doc, eos_token_id]
    return torch.tensor(ids, dtype=torch.long)
