"""The package's import graph: no cycle among module-level imports, and core/ imports nothing else of ours.

A cycle works only as long as nobody moves an import line, and the error it gives when it
breaks (a partially initialised module) points at neither module. The graph is read
statically with `ast`, so a cycle hidden behind the import order that happens to work today
is still found. Imports inside functions (deliberately lazy) and under `if TYPE_CHECKING:`
are not edges.
"""

import ast
from pathlib import Path

PKG = "socialalign_jax"
ROOT = Path(__file__).resolve().parents[2] / PKG


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _top_level_imports(tree: ast.Module):
    """Import nodes executed when the module is imported (not inside defs or TYPE_CHECKING blocks)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" not in test:
                todo.extend(node.body + node.orelse)
        elif isinstance(node, (ast.Try, ast.With)):
            todo.extend(node.body)
            for h in getattr(node, "handlers", []):
                todo.extend(h.body)
            todo.extend(getattr(node, "orelse", []) + getattr(node, "finalbody", []))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            # An edge is a module whose body must have run for this import to succeed: `from
            # pkg import sub` needs the submodule `sub`; `from pkg import name` needs pkg's
            # __init__ to have defined `name`. (A package's __init__ importing its own
            # submodules is not a cycle: Python registers the package before running them.)
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def _cycles(graph):
    """Every cycle found by depth-first search, each as a list of modules (first == last)."""
    out, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                out.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return out


def test_the_graph_is_read():
    """The reader sees real edges (so an empty graph cannot pass the cycle test vacuously)."""
    g = import_graph()
    assert len(g) > 60
    assert f"{PKG}.model.pac_lora" in g[f"{PKG}.model.modules"] or f"{PKG}.model.pac_lora" in g[f"{PKG}.model.decoder"]
    assert f"{PKG}.core.errors" in g[f"{PKG}.runs.checkpoint"]


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_imports_nothing_else_of_ours():
    g = import_graph()
    bad = {m: sorted(t for t in deps if not t.startswith(f"{PKG}.core"))
           for m, deps in g.items() if m.startswith(f"{PKG}.core")}
    assert not any(bad.values()), bad
