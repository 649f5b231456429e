"""The package's shape (../shared/DESIGN.md): imports flow one way, nothing under colm/ imports the CLI but
``__main__``, there is no import cycle (module-level or inside functions), and modules stay small."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "colm"
MAX_LINES = 350
LONG_ALLOWED: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
PACKAGES = {module_name(p) for p in PKG.rglob("__init__.py")}


def inside(name: str, package: str) -> bool:
    return name.startswith(package + ".")


def raw_imports(name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import in ``name``'s file, at module level or inside functions,
    relative imports resolved against the package."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if name in PACKAGES else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(mod, a.name) for a in node.names]
    return out


def reexports(package: str) -> dict[str, str]:
    """Names a package's __init__ imports from its own submodules: name -> the submodule that defines it."""
    out = {}
    for mod, name in raw_imports(package):
        if name and inside(mod, package) and mod in MODULES:
            out[name] = f"{mod}.{name}" if f"{mod}.{name}" in MODULES else mod
    return out


REEXPORTS = {p: reexports(p) for p in PACKAGES}


def target(mod: str, name: str | None) -> str | None:
    """The colm module an import really depends on: ``from X import y`` is X.y when that is a module, the submodule
    that defines y when package X re-exports it, else X.  None for anything outside colm."""
    while name is not None:
        if f"{mod}.{name}" in MODULES:
            return f"{mod}.{name}"
        if name not in REEXPORTS.get(mod, {}):
            break
        mod, name = REEXPORTS[mod][name], None
    return mod if mod in MODULES else None


def build_graph() -> dict[str, set[str]]:
    """Nodes are modules.  A package is two nodes: ``P.__init__`` (the code in its __init__, which its submodules may
    import: the interface) and ``P`` (that code plus the submodules it pulls in, which is what a module outside P
    gets).  So a package importing its own submodules, which import the package's interface, is not a cycle, while a
    chain that leaves the package and comes back is."""
    graph = {}
    for name in MODULES:
        deps = set()
        for mod, imported in raw_imports(name):
            t = target(mod, imported)
            if t is None or t == name:
                continue
            if t in PACKAGES and inside(name, t):
                t = f"{t}.__init__"
            deps.add(t)
        if name in PACKAGES:
            own = {d for d in deps if inside(d, name) and not d.startswith(f"{name}.__init__")}
            graph[f"{name}.__init__"] = deps - own
            graph[name] = own | {f"{name}.__init__"}
        else:
            graph[name] = deps
    return graph


GRAPH = build_graph()


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_graph_sees_relative_and_function_level_imports():
    assert "colm.models" in GRAPH["colm.head"]                    # from .models import ... (module level)
    assert "colm.train.objectives" in GRAPH["colm.scoring"]       # from .train import auc (in a function; re-export)
    assert "colm.loading" in GRAPH["colm.train.command"]          # from ..loading import ... (two dots)
    assert "colm.train.features" in GRAPH["colm.train"]           # a package importing its own submodules
    assert "colm.cli" in GRAPH["colm.__main__"]


def test_only_main_imports_the_cli():
    offenders = sorted(n for n in MODULES if "colm.cli" in GRAPH[n] and n != "colm.__main__")
    assert offenders == [], f"{offenders} import colm.cli; the CLI sits on top (DESIGN.md): move what they need down"


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    path = MODULES[name]
    rel = path.relative_to(ROOT).as_posix()
    n = len(path.read_text().splitlines())
    if n <= MAX_LINES or rel in LONG_ALLOWED:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "longer than 350 lines because" in doc, (
        f"{rel} has {n} lines (> {MAX_LINES}): split it, or say in its docstring why it is "
        "'longer than 350 lines because ...'")
