"""One-way layers (docs/architecture.md, "The parts and the direction of imports"): the store
(`prefix_store`) imports nothing from the server package (`prefixserve`); the server imports the store;
and no module of either imports, through any chain, a module that imports it back (deferred imports and
imports under TYPE_CHECKING counted)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "prefix_store"
SERVER = "prefixserve"
PACKAGES = {"prefix_store": STORE, SERVER: ROOT / "server"}  # import name -> its directory


def _upward(tree: ast.AST) -> list[str]:
    """Every import of the server package in a module: `import`/`from` statements (at any depth, under
    TYPE_CHECKING too) and string arguments to `importlib.import_module` / `__import__`."""
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"line {node.lineno}: {n}" for n in names if n == SERVER or n.startswith(SERVER + ".")]
    return found


def test_the_store_imports_nothing_from_the_server_package():
    modules = sorted(STORE.rglob("*.py"))  # kinds/ and any later subpackage too
    assert modules, f"no modules found under {STORE}"
    upward = {
        str(m.relative_to(STORE)): hits
        for m in modules
        if (hits := _upward(ast.parse(m.read_text(), str(m))))
    }
    assert upward == {}, f"prefix_store imports {SERVER}: {upward}"


def test_the_check_sees_every_form_of_upward_import():
    src = (
        "import prefixserve\nfrom prefixserve.model import X\nimport prefixserve.errors as e\n"
        "import importlib\nimportlib.import_module('prefixserve.engine')\n__import__('prefixserve')\n"
        "def f():\n    from prefixserve import inputs\n"
        "import prefixserve_client\nfrom .errors import E\n"
    )
    assert len(_upward(ast.parse(src))) == 6


def test_importing_every_store_module_loads_no_server_module():
    names = sorted(name for name in _modules() if name.startswith("prefix_store."))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m == {SERVER!r} or m.startswith({SERVER + '.'!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing the store loaded {out.stdout.strip()}"


# ---- no import cycles ------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    """Every module of both packages by its import name (a package by its __init__.py)."""
    found = {}
    for name, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = [name, *path.relative_to(base).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its text (top level, in functions, under
    TYPE_CHECKING; `from . import x` counts x and the package)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from m import f`: the module m
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_itself_back_through_a_chain():
    modules = _modules()
    assert "prefix_store.kinds.kv" in modules and "prefixserve.engine.core" in modules
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == [], "import cycles (each a set of modules importing one another)"


def test_the_cycle_check_finds_a_cycle_through_a_deferred_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    modules = {"p": tmp_path / "__init__.py", "p.m": tmp_path / "m.py", "p.n": tmp_path / "n.py"}
    modules["p.m"].write_text(
        "def f():\n    from .n import g\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import m\n"
    )
    assert _imports("p.m", modules["p.m"], modules) == {"p.n", "p"}  # itself not counted
