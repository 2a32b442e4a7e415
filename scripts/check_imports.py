"""Check what the scripts import, as import-linter checks the package: no script imports another in a circle
(imports inside functions count), none imports an underscore name, and none reaches past ``open_backbone``
into ``graytune.backbones``.

Run: .venv/bin/python scripts/check_imports.py   (exit status 1 and one line per problem when any is found)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
BOUNDARY = "graytune.backbones"


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every import of a file, at any depth: ``(module, names imported from it, line)``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of scripts that import each other, directly or around a loop (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def problems(folder: Path = SCRIPTS) -> list[str]:
    scripts = {path.stem: path for path in sorted(folder.glob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in scripts}
    found = []
    for name, path in scripts.items():
        for module, names, line in imports(path):
            where = f"{path.name}:{line}"
            if module in scripts:
                graph[name].add(module)
            if module == BOUNDARY or module.startswith(BOUNDARY + "."):
                found.append(f"{where}: imports {module}; open a backbone with graytune.open_backbone")
            private = [n for n in names if n.startswith("_")]
            private += [part for part in module.split(".") if part.startswith("_") and part != "__future__"]
            if private:
                found.append(f"{where}: imports the underscore name(s) {', '.join(private)} from {module}")
    found += [f"import cycle: {' -> '.join(group + group[:1])}" for group in cycles(graph)]
    return found


def main() -> None:
    found = problems()
    for problem in found:
        print(problem)
    print(f"{len(list(SCRIPTS.glob('*.py')))} scripts checked: "
          + (f"{len(found)} problem(s)" if found else "no import cycle, no underscore name, nothing past open_backbone"))
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
