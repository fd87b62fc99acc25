"""The import graph of the installed package: no module imports, at module level, one that imports it
back (directly or around a longer circle), and the CLI is the trimode/cli/ package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pyproject's [tool.setuptools.package-dir]: the stage folders install under trimode.*
PACKAGE_DIRS = {
    "trimode": ROOT / "trimode",
    "trimode.builder": ROOT / "builder",
    "trimode.plugins": ROOT / "plugins",
    "trimode.quantize": ROOT / "quantize",
    "trimode.triton_repo": ROOT / "triton_repo",
}


def find_modules(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file, for every .py file under the package folders."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def runs_at_import(test: ast.expr) -> bool:
    """False for the blocks a plain import skips: `if TYPE_CHECKING:` and `if __name__ == "__main__":`."""
    source = ast.unparse(test)
    return source not in ("TYPE_CHECKING", "typing.TYPE_CHECKING") and "__main__" not in source


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: not those inside functions."""
    found = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if runs_at_import(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, (ast.Try, ast.With, ast.For, ast.While, ast.ClassDef)):
                for field in ("body", "orelse", "finalbody"):
                    walk(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    walk(handler.body)

    walk(tree.body)
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that module `name` imports at module level (`from a import b` names
    a.b where b is a module, else a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def known(target: str) -> str | None:  # the longest prefix that is a module: trimode.x.Name -> trimode.x
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    targets = set()
    for node in module_level_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {known(alias.name) for alias in node.names}
            continue
        base = node.module or ""
        if node.level:  # relative: from . import x, from ..y import z
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            targets.add(known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else known(base))
    return targets - {None, name}


def import_graph(package_dirs: dict[str, Path]) -> dict[str, set[str]]:
    modules = find_modules(package_dirs)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is checked
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIRS)
    assert {"trimode", "trimode.cli", "trimode.errors", "trimode.builder", "trimode.triton_repo.server"} <= set(graph)
    assert sum(map(len, graph.values())) > 100  # the walk sees the imports at all
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_command_modules_never_import_the_cli_package_or_the_group():
    graph = import_graph(PACKAGE_DIRS)
    commands = [
        name
        for name in graph
        if name.startswith("trimode.cli.") and name not in ("trimode.cli.__main__", "trimode.cli.group")
    ]
    assert "trimode.cli.serve" in commands
    for name in commands:
        assert not graph[name] & {"trimode.cli", "trimode.cli.group"}, name


def test_the_cli_is_the_cli_package():
    assert (ROOT / "trimode" / "cli" / "__init__.py").is_file()
    assert (ROOT / "trimode" / "cli" / "__main__.py").is_file()  # python -m trimode.cli
    assert sorted(p.name for p in (ROOT / "trimode").glob("cli*.py")) == []
    from trimode.cli import main

    assert {"generate", "build", "serve", "deploy", "bench", "eval"} <= set(main.commands)


# The old layout: cli.py imported its command modules at its bottom, and they imported its helpers.
OLD_LAYOUT = {
    "__init__.py": "",
    "errors.py": "class TrimodeError(Exception): ...\n",
    "cli.py": "from trimode.errors import TrimodeError\n\ndef _echo_json(x): ...\n\n"
    "if __name__ == '__main__':\n    from trimode.cli import main\n\n"
    "import trimode.cli_engine  # noqa: E402\n",
    "cli_engine.py": "from __future__ import annotations\nfrom trimode.cli import _echo_json\n",
    "lazy.py": "def f():\n    import trimode.cli\n",  # inside a function: not an edge
    "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trimode import cli\n",
}


@pytest.mark.parametrize(
    "files, cycle",
    [
        (OLD_LAYOUT, ["trimode.cli", "trimode.cli_engine", "trimode.cli"]),
        ({**OLD_LAYOUT, "cli_engine.py": "from trimode.errors import TrimodeError\n"}, None),
        ({**OLD_LAYOUT, "cli_engine.py": "from . import cli\n"}, ["trimode.cli", "trimode.cli_engine", "trimode.cli"]),
        (
            {
                **OLD_LAYOUT,
                "cli_engine.py": "",
                "errors.py": "try:\n    from .cli import x\nexcept ImportError:\n    pass\n",
            },
            ["trimode.cli", "trimode.errors", "trimode.cli"],
        ),
    ],
)
def test_find_cycle_reports_the_circle(tmp_path, files, cycle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    graph = import_graph({"trimode": tmp_path})
    assert "trimode.cli" not in graph["trimode.lazy"] | graph["trimode.typed"]
    assert find_cycle(graph) == cycle
