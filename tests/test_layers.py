"""The layering, checked on the source: every import of a project module (at the top or inside a function) points
down, and no modules import each other in a cycle.

    entry      app.py, core/cli.py, core/__main__.py, export/__main__.py
    training   core/* (data, train, features, report, summary, ...)
    export     export/*
    models     models/*
    runtime    core/runtime/* (and core/__init__.py, which holds only the version): no torch

``python tests/test_layers.py`` prints the import graph by layer and what the checks found. Imports by name in a
string (``export/__init__.py``'s lazy ``importlib.import_module`` map, all within ``export``) are not seen.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "export", "models")
LAYERS = ("runtime", "models", "export", "training", "entry")
ENTRY = {"app", "core.cli", "core.__main__", "export.__main__"}


def layer_of(module: str) -> str:
    if module in ENTRY:
        return "entry"
    if module == "core" or module == "core.runtime" or module.startswith("core.runtime."):
        return "runtime"
    top = module.split(".")[0]
    return {"models": "models", "export": "export", "core": "training"}[top]


def project_modules() -> dict[str, Path]:
    """Module name -> file, for app.py and every module of the project's packages."""
    found = {"app": REPO / "app.py"}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file (lazy imports inside functions included)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from core import diagnostics` imports the module core.diagnostics; `from core.x import f`, core.x
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import core.runtime.files as f` -> core.runtime.files
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, targets in sorted(graph.items())
            for b in sorted(targets) if rank[layer_of(b)] > rank[layer_of(a)]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ------------------------------------------------------------------------------------------------ the checks


def test_every_project_import_points_down_a_layer():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the project (a broken walk would pass vacuously)
    assert upward_imports(graph) == []


def test_no_import_cycles_lazy_or_not():
    assert cycles(import_graph()) == []


def test_the_runtime_layer_imports_only_itself():
    graph = import_graph()
    outside = {f"{a} -> {b}" for a, targets in graph.items() if layer_of(a) == "runtime" for b in targets
               if layer_of(b) != "runtime"}
    assert outside == set()


def test_the_checks_see_a_planted_cycle_and_an_upward_import():
    """The walk itself: relative and lazy imports are resolved, so a cycle or an upward arrow would be caught."""
    planted = {"core.runtime.files": {"core.train"}, "core.train": {"core.runtime.files"}, "models": set()}
    assert cycles(planted) == [["core.runtime.files", "core.train"]]
    assert upward_imports(planted) == ["core.runtime.files (runtime) imports core.train (training)"]
    graph = import_graph()
    assert "core.train" in graph["core.report"]  # `from .train import CompareResult`
    assert "export.runs" in graph["core.report"]  # imported inside a function
    assert "core.runtime.errors" in graph["models._registry"]


if __name__ == "__main__":
    graph = import_graph()
    for layer in reversed(LAYERS):
        members = sorted(m for m in graph if layer_of(m) == layer)
        print(f"{layer:9s} ({len(members)} modules): {', '.join(members)}")
    edges = sum(len(t) for t in graph.values())
    print(f"{edges} import edges between {len(graph)} project modules")
    print("upward imports:", upward_imports(graph) or "none")
    print("cycles:", cycles(graph) or "none")
    sys.exit(1 if upward_imports(graph) or cycles(graph) else 0)
