"""The package's import graph: no cycle among module-level imports, no import of a later layer
(LAYERS), core/ imports nothing else of ours, and every function-level import of ours says why.

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


# ------------------------------------------------------------------------------------ layers
# Each package may import only the packages before it (and itself). Read bottom-up, the list
# is the order in which the code builds on itself: plain helpers; how arrays sit on devices;
# the model; where its weights come from; a run's config, checkpoints and restore; the data;
# using a trained model; scoring outputs; training (which generates and evaluates at its end);
# then the crowd predictor, the experiments and the tools that drive all of the above.
LAYERS = ("core", "parallel", "model", "weights", "runs", "data", "inference", "evaluation", "train",
          "predict", "experiments", "tools")


def _all_imports(tree: ast.Module):
    """Every import of ours in a module, at module level or inside a function: (node, target module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PKG + "."):
            yield node, node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PKG + "."):
                    yield node, a.name


def _function_level_imports(tree: ast.Module):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def upward_imports(root: Path = ROOT, layers=LAYERS) -> list[str]:
    """'file:line: a -> b' for every import (module- or function-level) of a package later in `layers`."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            continue  # the package's own __init__
        here = rel.parts[0]
        for node, target in _all_imports(ast.parse(path.read_text(encoding="utf-8"))):
            there = target.split(".")[1]
            if layers.index(there) > layers.index(here):
                out.append(f"{PKG}/{rel}:{node.lineno}: {here} -> {target}")
    return out


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), f"place new packages in LAYERS: {sorted(packages ^ set(LAYERS))}"


def test_an_upward_import_is_found(tmp_path):
    """The checker itself: a function-level import of a later package is reported with its line."""
    pkg = tmp_path / PKG
    for name in ("model", "train"):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text("")
    (pkg / "model" / "m.py").write_text("import os\n\ndef f():\n    from socialalign_jax.train import loop\n")
    (pkg / "train" / "t.py").write_text("from socialalign_jax.model import m\n")
    assert upward_imports(pkg, ("model", "train")) == [f"{PKG}/model/m.py:4: model -> {PKG}.train"]


def test_no_upward_import():
    bad = upward_imports()
    assert not bad, "imports of a later package (see LAYERS):\n" + "\n".join(bad)


def test_function_level_imports_of_ours_say_why():
    """An import of our own code inside a function hides a dependency from the reader and from the
    graph above; the few that remain keep a heavy third-party import (transformers) off the path
    of callers that never need it, and say so with a `# lazy: <why>` comment on the line."""
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in _function_level_imports(ast.parse("\n".join(lines))):
            ours = (isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PKG)) or \
                (isinstance(node, ast.Import) and any(a.name.startswith(PKG) for a in node.names))
            text = "\n".join(lines[node.lineno - 1:node.end_lineno])
            if ours and "# lazy:" not in text:
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {text.strip()}")
    assert not bad, "function-level imports without a '# lazy: <why>' comment:\n" + "\n".join(bad)
