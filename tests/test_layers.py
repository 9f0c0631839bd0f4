"""The package's layers: a module never imports from a layer above its own (not even inside a function), no two
modules import each other in a circle, and only the compatibility module reaches into transformers' internals."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[list[str]] = [
    ["attnshare.errors", "attnshare.paths", "attnshare.version", "attnshare.hf_compat", "attnshare.config",
     "attnshare.memory", "attnshare.allocator", "attnshare.progress"],
    ["attnshare.arch", "attnshare.plan"],
    ["attnshare.attention"],
    ["attnshare.data", "attnshare.models"],
    ["attnshare.evaluate"],
    ["attnshare.sharing"],
    ["attnshare.analysis"],  # measurements of a base model
    ["attnshare.training"],
    ["attnshare.methods"],
    ["attnshare.artifact", "attnshare.api", "attnshare.analysis.analyze", "attnshare.analysis.report"],
    ["attnshare.bench", "attnshare.report"],
    ["attnshare.cli", "attnshare.__main__", "attnshare"],
]

INTERNALS = re.compile(r"^transformers\.(cache_utils|masking_utils|modeling_utils|models|utils|generation)\b")
COMPAT = "attnshare.hf_compat"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports at run time, at module level or inside functions (``from x import y`` names
    x.y when y is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports only type checkers see are no runtime dependency
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (SRC / Path(*candidate.split("."))).is_dir() or (SRC / Path(*candidate.split("."))).with_suffix(
                        ".py").is_file():
                    out.add(candidate)
    return out


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


MODULES = {module_name(p): p for p in (SRC / "attnshare").rglob("*.py")}
GRAPH = {m: {t for t in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports from higher layers: {upward}"


def test_no_import_circles():
    # Tarjan's strongly connected components over the module graph (package __init__ modules included, since
    # importing a submodule runs its package first)
    graph = {m: set(ts) for m, ts in GRAPH.items()}
    for m in MODULES:
        parent = m.rpartition(".")[0]
        if parent in MODULES:
            graph[m].add(parent)
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    # a package __init__ that re-exports its own submodules forms a harmless loop with them; any other is a circle
    real = [c for c in circles if not all(m.startswith(min(c, key=len)) for m in c)]
    assert not real, f"import circles: {real}"


def test_only_the_compat_module_touches_transformers_internals():
    offenders = {m: sorted(t for t in imports(p) if INTERNALS.match(t)) for m, p in MODULES.items() if m != COMPAT}
    assert not {m: t for m, t in offenders.items() if t}


def test_no_class_swaps_in_the_library():
    assert not [str(p) for p in MODULES.values() if "__class__ =" in p.read_text()]
