"""The package's imports flow one way (docs/architecture.md, "Layers"): no import circle, and no module imports a
layer above its own. The graph is read with `ast` from every `import` statement, those inside functions included
(a lazy import is how a circle hides)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "semiseg"

LAYERS = [
    ("base", ["semiseg.errors", "semiseg.atomic", "semiseg.config"]),
    ("data, models, tensor functions", ["semiseg.data", "semiseg.models", "semiseg.losses", "semiseg.ops"]),
    ("engine", ["semiseg.engine"]),
    ("methods", ["semiseg.methods"]),
    (
        "tools",
        ["semiseg.cli", "semiseg.bench", "semiseg.results", "semiseg.report", "semiseg.predict", "semiseg.demo"]
        + ["semiseg.suggest", "semiseg.__main__"],
    ),
]
"""bottom to top; a module may import its own layer and those below"""


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from a.b import c` counts as a.b.c when that is a module)."""

    def known(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {known(a.name) for a in node.names if a.name.startswith("semiseg")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("semiseg"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    edges.add(full if full in mods else known(node.module))
        graph[name] = edges - {name, "semiseg"}
    return graph


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to docs/architecture.md")


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when the graph is acyclic (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str]:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        stack.pop()
        state[v] = 2
        return []

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return []


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    assert find_cycle(import_graph(modules())) == []


def test_every_module_has_a_layer():
    for name in modules():
        if name != "semiseg":
            layer_of(name)


@pytest.mark.parametrize("layer", range(len(LAYERS)), ids=[name for name, _ in LAYERS])
def test_imports_go_down_the_layers(layer):
    graph = import_graph(modules())
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a in graph
        if a != "semiseg" and layer_of(a) == layer
        for b in graph[a]
        if layer_of(b) > layer
    ]
    assert upward == []


def test_report_reads_results_without_the_bench():
    graph = import_graph(modules())
    assert "semiseg.bench" not in graph["semiseg.report"]
    assert "semiseg.results" in graph["semiseg.report"]


def test_method_files_import_no_other_method():
    from semiseg.methods import METHODS

    graph = import_graph(modules())
    files = {m.__name__ for m in METHODS.values()}
    for name in files:
        assert graph[name] & files == set(), name
