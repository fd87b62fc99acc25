"""The documentation names only commands and options that exist.

Every `trimode ...` (or `python -m trimode.cli ...`) command line in README.md and docs/*.md, in
fenced code blocks and in inline code spans, must name an existing subcommand, and every `--option`
token on it must be one of that subcommand's options (click's `.opts` / `.secondary_opts`) and
appear in its `--help`. Placeholders (ENGINE, DIR, CK), `[...]` brackets and `a|b` alternatives are
read as such: only the `-x` / `--option` tokens are checked. Also: README.md stays short, the docs
pages exist, and relative links in them resolve.
"""

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from trimode.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [
    "architecture.md",
    "engines.md",
    "serving.md",
    "performance.md",
    "draft-adapter.md",
    "guarantees.md",
    "testing.md",
    "quantization.md",
    "python-api.md",
]
README_MAX_LINES = 250

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
SHELL_OPS = {"&&", "||", ";", "|", ">", ">>", "<", "2>&1", "&"}
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}
OPTION = re.compile(r"^(--?[A-Za-z][A-Za-z0-9-]*)")


def _doc_files():
    return [README] + sorted(DOCS.glob("*.md"))


def _code_lines(text):
    """(fenced code lines joined into commands, inline code spans) of one markdown text."""
    commands = []
    for block in FENCE.findall(text):
        if block[3:].split("\n", 1)[0].strip() not in SHELL_FENCES:
            continue  # python, json, ...: not command lines
        lines = block.splitlines()[1:-1]
        joined = []
        for line in lines:
            stripped = line.strip()
            # A continuation: the previous line ended with a backslash, or this one is an indented
            # option list under a command (`              [--max-input-len 256] ...`).
            if joined and (joined[-1].endswith("\\") or (line[:1].isspace() and stripped[:1] in ("[", "-"))):
                joined[-1] = joined[-1].rstrip("\\").rstrip() + " " + stripped
            else:
                joined.append(stripped)
        commands += joined
    prose = FENCE.sub("", text)
    commands += [" ".join(span.split()) for span in SPAN.findall(prose)]
    return commands


def _tokens(segment):
    try:
        return shlex.split(segment, comments=True)
    except ValueError:  # an unbalanced quote in prose-like code: plain words are good enough here
        return segment.split("#", 1)[0].split()


def _invocations(command):
    """[(subcommand or None, [tokens after it up to a shell operator])] found in one command line."""
    tokens = _tokens(command)
    found = []
    for i, tok in enumerate(tokens):
        if tok == "trimode" or tok.endswith("/trimode"):
            start = i + 1
        elif tok == "trimode.cli" and i > 0 and tokens[i - 1] == "-m":
            start = i + 1
        else:
            continue
        rest = []
        for t in tokens[start:]:
            if t in SHELL_OPS:
                break
            rest.append(t)
        if not rest:
            continue  # `trimode` alone: the name, not a command line
        found.append(rest)
    return found


def _options_of(command):
    names = {"--help"}
    for p in command.params:
        if isinstance(p, click.Option):
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def _option_tokens(args):
    """Every -x / --option in args, through [...] brackets and a|b alternatives."""
    out = []
    for tok in args:
        for piece in tok.replace("[", " ").replace("]", " ").replace("|", " ").split():
            m = OPTION.match(piece.split("=", 1)[0])
            if m and not re.match(r"^-\d", piece):
                out.append(m.group(1))
    return out


def _all_invocations():
    cases = []
    for path in _doc_files():
        for command in _code_lines(path.read_text(encoding="utf-8")):
            for args in _invocations(command):
                cases.append((path.relative_to(ROOT).as_posix(), command, args))
    return cases


CASES = _all_invocations()


def test_docs_have_command_lines():
    assert len(CASES) > 50, "the parser found almost no `trimode ...` lines: the test would prove nothing"
    assert {args[0] for _, _, args in CASES} >= set(main.commands), (
        "every subcommand should appear in the docs at least once"
    )


@pytest.mark.parametrize("where,command,args", CASES, ids=[f"{w}:{c[:60]}" for w, c, _ in CASES])
def test_command_lines_name_real_subcommands_and_options(where, command, args):
    head = args[0]
    if head in ("...", "COMMAND", "CMD"):
        return  # `trimode ...`: a placeholder for any command line
    if head.startswith("-"):
        known = {o for p in main.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        bad = [o for o in _option_tokens(args) if o not in known]
        assert not bad, f"{where}: `{command}`: trimode has no option {bad}"
        return
    assert head in main.commands, f"{where}: `{command}`: no subcommand {head!r} (have {sorted(main.commands)})"
    known = _options_of(main.commands[head])
    bad = [o for o in _option_tokens(args[1:]) if o not in known]
    assert not bad, f"{where}: `{command}`: `trimode {head}` has no option(s) {bad}"


@pytest.mark.parametrize("name", sorted(main.commands))
def test_help_lists_the_options_the_docs_use(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    used = {o for _, _, args in CASES if args[0] == name for o in _option_tokens(args[1:])}
    missing = [o for o in sorted(used) if o != "--help" and o not in result.output]
    assert not missing, f"`trimode {name} --help` does not show {missing}, which the docs use"


def test_the_parser_reads_what_the_docs_write():
    lines = _code_lines(
        "```bash\ntrimode build [CK] --out ENGINE [--backend torch|onnx]\n"
        "              [--max-input-len 256]\ntrimode bench --engine E \\\n    --repeats 3\n```\n"
        "and `python -m trimode.cli eval\nCK --json` in prose, `trimode/assets/default` a path"
    )
    found = [args for line in lines for args in _invocations(line)]
    assert found == [
        ["build", "[CK]", "--out", "ENGINE", "[--backend", "torch|onnx]", "[--max-input-len", "256]"],
        ["bench", "--engine", "E", "--repeats", "3"],
        ["eval", "CK", "--json"],
    ]
    assert _code_lines("```python\nfrom trimode import LLM\n```\n") == []  # not a command line
    assert "--max-seqlen" not in _options_of(main.commands["build"])  # what a typo would hit
    assert _option_tokens(found[0]) == ["--out", "--backend", "--max-input-len"]
    assert _option_tokens(["--engine", "ENGINE_DIR|--url", "HOST:PORT", "--x=1", "-1"]) == ["--engine", "--url", "--x"]


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize("page", PAGES)
def test_docs_pages_exist_and_are_linked(page):
    path = DOCS / page
    assert path.is_file(), f"docs/{page} is missing"
    assert path.read_text(encoding="utf-8").startswith("# "), f"docs/{page} should start with a title"
    assert f"docs/{page}" in README.read_text(encoding="utf-8"), f"README.md does not link docs/{page}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            bad.append(target)
    assert not bad, f"{path.relative_to(ROOT)}: links to missing files {bad}"
