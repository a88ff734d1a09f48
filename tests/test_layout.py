"""The package layout: imports run one way (no cycles), kernels/ is the floor, and every module imports alone.

The static scan reads every import of phi3fast/ and kernels/ (installed as phi3fast.kernels), including the ones
inside functions, since a lazy import is still a dependency. Imports under `if TYPE_CHECKING:` never run, so they
do not count as cycles; kernels/ may not have even those from the layers above.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Cycles the lead accepts for now, each the sorted modules of one strongly connected component (none left: the
# rag and hnsw restructures removed theirs). A new entry needs a reason next to it.
PENDING: set[tuple[str, ...]] = set()


def module_files() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (kernels/ as phi3fast.kernels)."""
    out = {}
    for top, prefix in ((ROOT / "phi3fast", "phi3fast"), (ROOT / "kernels", "phi3fast.kernels")):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported phi3fast module, under TYPE_CHECKING) for every import statement of one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing_only)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, typing_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, typing_only))
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return [(target, t) for target, t in found if target == "phi3fast" or target.startswith("phi3fast.")]


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Runtime import edges: every module an import names, and the packages that importing it runs first (a, a.b
    for a.b.c), except the packages the importer itself sits in, which are already running when it executes."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
        for target, typing_only in imports(name, path, modules):
            if typing_only:
                continue
            while target not in modules:  # an attribute of a module: the module
                target = target.rpartition(".")[0]
            if target != name:  # a name taken from a parent package's __init__ is a real dependency
                edges[name].add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                dep = ".".join(parts[:i])
                if dep in modules and dep not in own:
                    edges[name].add(dep)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_the_scan_sees_lazy_and_relative_imports() -> None:
    """The scanner itself: an import inside a function and a relative import are both edges."""
    modules = module_files()
    edges = graph(modules)
    assert "phi3fast.kernels.backend" in edges["phi3fast.kernels.nf4"]  # `from .backend import ...`
    assert "phi3fast.sysinfo" in edges["phi3fast.cli.info"]  # imported inside the verb
    assert "phi3fast.model" in edges["phi3fast.generate"]  # the package runs before its module
    fake = {"a.x": Path(), "a.y": Path(), "a": Path()}
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.x"}, "a": set()}) == [("a.x", "a.y")]
    assert cycles({k: set() for k in fake}) == []


def test_no_import_cycles() -> None:
    found = set(cycles(graph(module_files())))
    assert found - PENDING == set(), f"import cycles: {sorted(found - PENDING)}"


def test_kernels_import_nothing_above_them() -> None:
    modules = module_files()
    for name, path in modules.items():
        if not name.startswith("phi3fast.kernels"):
            continue
        # The compiled module (phi3fast._hnsw, no Python imports of its own) sits below kernels/: the native CPU
        # kernels (kernels/nf4_cpu.py) call into it.
        upward = [
            t
            for t, _ in imports(name, path, modules)
            if not t.startswith("phi3fast.kernels") and t != "phi3fast._hnsw"
        ]
        assert not upward, f"{path.relative_to(ROOT)} imports {upward} (kernels/ is the floor)"


def test_each_module_imports_alone() -> None:
    """Each module in a fresh module table (phi3fast's modules dropped between imports; third-party ones and the
    compiled extension stay cached, as a real fresh interpreter would load them the same way)."""
    names = [n for n in module_files() if n != "phi3fast.__main__"]
    script = f"""
import importlib, json, sys, traceback
failed = {{}}
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.startswith("phi3fast") and m != "phi3fast._hnsw"]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 0, out.stderr
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
