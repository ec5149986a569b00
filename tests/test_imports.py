"""What imports what: supervisor/ never imports worker/ (nor MLX), worker/ never imports
supervisor/, shared/ imports neither, there are no import cycles (counting the imports inside
functions), and no module is over 400 lines without saying why in its docstring."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "supervisor", "worker")
MAX_LINES = 400
LONG_REASON = "Longer than 400 lines:"  # what a module's docstring says when it must be


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, at any depth (functions included), as dotted names; not
    the imports only type checkers see (`if TYPE_CHECKING:`), which cannot make a cycle."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test).endswith("TYPE_CHECKING")
                   for stmt in block.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                base = ".".join(parent[: len(parent) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(path, name) if m in mods and m != name}
                  for name, path in mods.items()}


@pytest.mark.parametrize(("package", "forbidden"), [
    ("supervisor", ("worker", "mlx", "mlx_lm")),
    ("worker", ("supervisor",)),
    ("shared", ("supervisor", "worker", "mlx", "mlx_lm")),
])
def test_packages_import_only_what_they_may(package, forbidden):
    bad = sorted(
        f"{name} imports {m}"
        for name, path in modules().items() if name.split(".")[0] == package
        for m in imports(path, name) if m.split(".")[0] in forbidden
    )
    assert bad == []


def test_there_are_no_import_cycles():
    graph = internal_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_supervisor_runs_without_the_worker_or_mlx_loaded():
    """Importing every supervisor module (what `overnight run/status/report` load) leaves
    worker/ and MLX out of the process."""
    names = [n for n in modules() if n.split(".")[0] == "supervisor"
             and not n.endswith("__main__")]
    code = ("import sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('worker', 'mlx', 'mlx_lm')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_is_long_without_a_reason():
    long = [f"{path.relative_to(ROOT)}: {n} lines"
            for path in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES
            and LONG_REASON not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert long == [], f"split them, or say why in the docstring ({LONG_REASON!r} ...)"
