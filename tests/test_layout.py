"""The package's shape: no import cycles inside gptkernels (module-level or inside functions), and a
README layout table that matches the tree."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "gptkernels")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the package."""
    mods = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                mods[".".join(rel)] = os.path.join(folder, f)
    return mods


def _imports(name: str, path: str, mods: dict[str, str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (lazy imports included).

    ``from . import x`` counts as importing ``x`` when x is a module, else the package itself; a
    package's own ``__init__`` is not counted as imported by its submodules (Python runs it first,
    but that is not a dependency of the submodule's code)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in mods else target)
    return {m for m in found if m in mods and m != name and not name.startswith(m + ".")}


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_sees_lazy_imports(tmp_path):
    """The check itself: a function-level import that closes a loop is found."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    mods = {"p": str(pkg / "__init__.py"), "p.a": str(pkg / "a.py"), "p.b": str(pkg / "b.py")}
    assert _imports("p.a", mods["p.a"], mods) == {"p.b"}
    assert _imports("p.b", mods["p.b"], mods) == {"p.a"}


def test_readme_layout_table_matches_the_tree():
    """Every path the README's layout table names exists, and every package folder is named."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index("## Layout"):]
    table = table[: table.index("\n## ", 4)] if "\n## " in table[4:] else table
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, flags=re.MULTILINE):
        for path in re.findall(r"`([^`]+)`", cell):
            named.add(path.rstrip("/"))
    assert named, "no paths found in the README's layout table"
    for path in sorted(named):
        assert os.path.exists(os.path.join(ROOT, path)), f"README layout names {path}, which does not exist"
    folders = {os.path.relpath(d, ROOT) for d, _, files in os.walk(PKG)
               if "__init__.py" in files}
    missing = sorted(f for f in folders if not any(p == f or p.startswith(f + "/") for p in named))
    assert not missing, f"package folders the README's layout table does not name: {missing}"
