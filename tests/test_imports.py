"""fastcifar's modules import one another without cycles (function-level imports included)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastcifar"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The fastcifar modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastcifar"):
            name = node.module.removeprefix("fastcifar").lstrip(".")
            found |= {name} if name else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("fastcifar.") for a in node.names if a.name.startswith("fastcifar.")}
    return found & modules


def test_no_module_imports_itself_through_others():
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {m: imports_of(PACKAGE / f"{m}.py", modules) - {m} for m in modules}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for nxt in graph[module]:
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in sorted(modules) if (c := cycle_from(m))]
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)
