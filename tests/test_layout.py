"""The product's layout: no import cycle among its modules, no source file over 600 lines.

Product modules are the packages installed under `leptonc` (leptonc/, passes/, targets/, calibration/,
models/). The imports that count are those that run when a module is imported: module level, and inside
module-level `if`/`try`/`with` blocks and class bodies (`if TYPE_CHECKING:` included). Imports inside
functions are deferred on purpose (heavy backends load lazily, STYLE.md 4) and do not count. Parsed
with ast; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"leptonc": "leptonc", "leptonc.passes": "passes", "leptonc.targets": "targets",
            "leptonc.calibration": "calibration", "leptonc.models": "models"}
MAX_LINES = 600
SOURCE_SUFFIXES = (".py", ".cu", ".cuh")


def _product_files() -> dict[str, Path]:
    """{module name: path} for every product .py file."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "leptonc" and parts and f"leptonc.{parts[0]}" in PACKAGES:
                continue  # not a real folder under leptonc/
            modules[name] = path
    return modules


def _import_time_nodes(tree: ast.AST):
    """Every node that runs at import time: all but the bodies of functions and lambdas."""
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The product modules `name` imports (`from pkg import mod` counts as pkg.mod when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_time_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # leptonc.x.y.func -> leptonc.x.y
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def _graph() -> dict[str, set[str]]:
    files = _product_files()
    known = set(files)
    graph = {name: _imports(path, name, known) for name, path in files.items()}
    # a package's __init__ is imported on the way to any of its modules; only the edges written in code
    # count here, so `import leptonc.passes.registry` is an edge to leptonc.passes.registry alone
    return graph


def test_the_import_graph_sees_the_product():
    graph = _graph()
    assert "leptonc.compiler" in graph and "leptonc.passes.registry" in graph
    assert "leptonc.targets.backends.onnxruntime" in graph and "leptonc.calibration.quantize" in graph
    assert "leptonc.passes.registry" in graph["leptonc.passes.fuse_gqa"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_product_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each group imports itself through the others):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_product_source_file_over_600_lines():
    long = []
    for folder in PACKAGES.values():
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file():
                lines = path.read_text(encoding="utf-8", errors="replace").count("\n")
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, f"product source files over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)
