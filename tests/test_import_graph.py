"""diffkd's imports flow one way: the graph built from every import statement in the source has no cycle, the low
layers import nothing above them, and the few imports left inside functions are the start-up deferrals listed here.
"""

import ast
from pathlib import Path

import pytest

from diffkd.method_options import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "diffkd"

# Imports of diffkd modules inside functions, each deferred so that `diffkd --help`, a config error or a light
# import of the package does not load torch (importer -> imported). Nothing here may dodge a cycle.
DEFERRED_FOR_STARTUP = {
    ("diffkd", "diffkd.api"), ("diffkd", "diffkd.config"), ("diffkd", "diffkd.evaluation.sweep"),
    ("diffkd.evaluation", "diffkd.evaluation.sweep"),
    ("diffkd.evaluation.cli", "diffkd.evaluation.report"), ("diffkd.evaluation.cli", "diffkd.evaluation.sweep"),
    ("diffkd.cli", "diffkd.api"), ("diffkd.cli", "diffkd.methods"), ("diffkd.cli", "diffkd.sample_cache"),
    ("diffkd.cli", "diffkd.plan_check"),
}

# Layers, lowest first: a module imports only from its own layer or below (evaluation sits beside the trainer).
LOW_LAYERS = ("diffkd.errors", "diffkd.validation", "diffkd.method_options", "diffkd.eval_options",
              "diffkd.config", "diffkd.schedule")
ABOVE_LOSSES = ("diffkd.students", "diffkd.methods", "diffkd.trainer", "diffkd.api", "diffkd.cli",
                "diffkd.evaluation", "diffkd.sample_cache")


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of the package at ``root`` (a package is its ``__init__``)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_edges(root: Path) -> set[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import statement between modules of the package: top
    level, inside functions, under ``if TYPE_CHECKING``; relative imports resolved; ``from p import m`` is an edge
    to module ``p.m`` when there is one, else to ``p``."""
    modules = module_names(root)
    edges = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, in_function in _imports(tree):
            for target in _targets(node, package, modules):
                module = next((t for t in _prefixes(target) if t in modules), None)
                if module is not None and module != name:
                    edges.add((name, module, in_function))
    return edges


def _imports(tree: ast.AST, in_function: bool = False):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        yield from _imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def find_cycle(edges: set[tuple[str, str, bool]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges:
        graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def diffkd_edges() -> set[tuple[str, str, bool]]:
    """The package's import edges, plus the registry's: ``diffkd.methods.method_class`` imports each registered
    method's module by name."""
    registered = {("diffkd.methods", entry.implementation.partition(":")[0], True) for entry in METHODS.values()}
    return import_edges(PACKAGE) | registered


def reachable(edges: set[tuple[str, str, bool]], start: str) -> set[str]:
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges:
        graph.setdefault(source, set()).add(target)
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_diffkd_imports_have_no_cycle():
    cycle = find_cycle(diffkd_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("low", LOW_LAYERS + ("diffkd.losses.kd", "diffkd.losses.features", "diffkd.sampling"))
def test_low_layers_import_nothing_above_them(low):
    above = sorted(m for m in reachable(diffkd_edges(), low) if m.startswith(ABOVE_LOSSES))
    assert not above, f"{low} reaches {above}"


def test_the_config_layer_reaches_only_torch_free_modules():
    assert reachable(diffkd_edges(), "diffkd.config") == {
        "diffkd.errors", "diffkd.validation", "diffkd.method_options", "diffkd.eval_options"}


def test_imports_inside_functions_are_only_the_startup_deferrals():
    inside = {(source, target) for source, target, in_function in import_edges(PACKAGE) if in_function}
    assert inside == DEFERRED_FOR_STARTUP


def test_every_registered_method_resolves_to_its_options_class():
    from diffkd.methods import method_class

    for name, entry in METHODS.items():
        cls = method_class(name)
        assert cls.name == name and cls.config_class is entry.options and entry.options().name == name


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("b_source", [
    "from pkg import a\n",                                            # absolute, top level
    "from . import a\n",                                              # relative
    "def f():\n    from pkg.a import x\n",                            # inside a function
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",  # type-checking only
])
def test_the_graph_sees_every_kind_of_import(tmp_path, b_source):
    root = write_package(tmp_path, {"__init__.py": "", "a.py": "from pkg.sub import b\nx = 1\n",
                                    "sub/__init__.py": "", "sub/b.py": b_source.replace("from . import a",
                                                                                         "from .. import a")})
    cycle = find_cycle(import_edges(root))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b"}


def test_a_package_without_a_loop_passes(tmp_path):
    root = write_package(tmp_path, {"__init__.py": "", "a.py": "from pkg import b\n", "b.py": "import os\n"})
    assert find_cycle(import_edges(root)) is None
    assert import_edges(root) == {("pkg.a", "pkg.b", False)}
