"""One-way layers (docs/architecture.md, "The parts and the direction of imports"): the store
(`prefix_store`) imports nothing from the server package (`prefixserve`); the server imports the store."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

STORE = Path(__file__).resolve().parent.parent / "prefix_store"
SERVER = "prefixserve"


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
    modules = sorted(STORE.glob("*.py"))
    assert modules, f"no modules found under {STORE}"
    upward = {m.name: hits for m in modules if (hits := _upward(ast.parse(m.read_text(), str(m))))}
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
    names = [f"prefix_store.{m.stem}" for m in sorted(STORE.glob("*.py")) if m.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m == {SERVER!r} or m.startswith({SERVER + '.'!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing the store loaded {out.stdout.strip()}"
