"""The package's layering (docs/design.md): the library never imports the applications in
``ulysses_dtensor/tools/``, and the library's module-level imports form no cycle."""

from __future__ import annotations

import ast

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "ulysses_dtensor"
LIBRARY = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")  # __main__ runs the CLI


def _imports(path, module_level_only: bool) -> set[str]:
    """Absolute ``ulysses_dtensor...`` names ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    package = "ulysses_dtensor" if path.parent == PACKAGE else "ulysses_dtensor." + path.parent.name
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:  # "from . import a, b": each name is a module
                found |= {f"{target}.{alias.name}" for alias in node.names}
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("ulysses_dtensor")}


def test_library_never_imports_the_tools():
    offenders = {p.name: sorted(n for n in _imports(p, module_level_only=False) if n.startswith("ulysses_dtensor.tools"))
                 for p in LIBRARY}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules importing ulysses_dtensor.tools: {offenders}"


def test_library_module_imports_have_no_cycle():
    graph = {f"ulysses_dtensor.{p.stem}": {n for n in _imports(p, module_level_only=True)
                                          if n != "ulysses_dtensor" and n.count(".") == 1}
             for p in LIBRARY if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 30, sorted(graph)  # the walk saw the library
