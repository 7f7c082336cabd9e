"""The package's import graph, read from the source (nothing is imported): no cycles, the library never imports the
test fixtures, no module grows past a size a reader can hold in mind.

How an import statement becomes edges (module -> module inside `hf_align`):

* `import hf_align.a.b` and `from hf_align.a import b` / `from .a import b` point at the module they name:
  `hf_align.a.b` when `b` is a submodule, else `hf_align.a` (`b` is then a name defined by `a`, or by
  `a/__init__.py` for a package).
  So `from . import register_method` in `methods/linear.py` is an edge to the package `hf_align.methods`, and
  `from .base import X` in `methods/linear.py` an edge to `hf_align.methods.base` only.
* The parent packages that Python also initialises on the way (`hf_align`, `hf_align.a`) are not edges: every
  submodule would otherwise depend on its package's `__init__`, and any package re-exporting its submodules would
  be a cycle. A module that wants a name from a package `__init__` says so (`from . import x`) and gets the edge.
* Imports inside functions count (they run, just later); imports under `if TYPE_CHECKING:` do not (they never run).
* `importlib.import_module("hf_align.x")` (or `import_module(".x", package=__name__)`) with constant strings counts;
  a computed name (`f"{__name__}.{name}"`, a registry scan with `pkgutil`) cannot be read from the source and does not.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "hf_align"
MAX_LINES = 600
# Modules allowed past MAX_LINES, each with the reason it cannot be split.
LINE_LIMIT_EXCEPTIONS: dict[str, str] = {}
# The layers, bottom to top: a module may import from its own folder and from the folders before it, never after.
# Top-level modules count as layers of their own: `version` below everything, `testing` (the fixtures, imported only
# by experiments) above; the package `__init__` (the public API) sits above them all.
LAYERS: tuple[str, ...] = (
    "version",
    "utils",
    "functional",
    "regularizers",
    "similarity",
    "methods",
    "encoders",
    "model",
    "features",
    "training",
    "evaluation",
    "integrations",
    "experiments",
    "commands",
    "testing",
)
# Who may import the test fixtures (`hf_align.testing`): the fixtures themselves and the experiments, which run on
# the synthetic task and the bundled digits. The library proper never does.
TESTING = f"{PACKAGE}.testing"
MAY_IMPORT_TESTING = (TESTING, f"{PACKAGE}.experiments")


@dataclass(frozen=True, order=True)
class Edge:
    source: str
    target: str
    line: int
    deferred: bool  # inside a function body: runs when called, not at import time

    def describe(self) -> str:
        where = "in a function" if self.deferred else "at import time"
        return f"{self.source} -> {self.target} (line {self.line}, {where})"


def package_root() -> Path:
    # find_spec of a top-level package locates it without running its __init__
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} is not an installed package"
    return Path(next(iter(spec.submodule_search_locations)))


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the package (package `__init__`s by their
    package's name). Files in folders without `__init__.py` (the `evaluate` scripts under `metrics/`) are included
    under their dotted path: they import the library and are loaded by path, so their edges matter too."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve_relative(module: str, level: int, target: str | None, modules: dict[str, Path]) -> str:
    """`from <level dots><target> import ...` written in `module` -> the absolute dotted name it refers to."""
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{target}" if target else package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _constant_import_module(call: ast.Call, module: str, modules: dict[str, Path]) -> str | None:
    """The module an `importlib.import_module(<constant>[, package=__name__])` call imports, else None."""
    func = call.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )
    if not named or not call.args:
        return None
    first = call.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return None
    name = first.value
    if not name.startswith("."):
        return name
    package = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "package"), None)
    if isinstance(package, ast.Name) and package.id in ("__name__", "__package__"):
        level = len(name) - len(name.lstrip("."))
        return _resolve_relative(module, level, name[level:] or None, modules)
    return None


class _ImportCollector(ast.NodeVisitor):
    """Every import the module can run, as (absolute name, `from ... import` names or None, line, deferred)."""

    def __init__(self, module: str, modules: dict[str, Path]):
        self.module, self.modules = module, modules
        self.found: list[tuple[str, tuple[str, ...] | None, int, bool]] = []
        self._depth = 0  # function nesting

    def _function(self, node) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # annotations only; the `else:` branch runs
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, None, node.lineno, self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            target = _resolve_relative(self.module, node.level, node.module, self.modules)
        else:
            target = node.module or ""
        self.found.append((target, tuple(a.name for a in node.names), node.lineno, self._depth > 0))

    def visit_Call(self, node: ast.Call) -> None:
        name = _constant_import_module(node, self.module, self.modules)
        if name is not None:
            self.found.append((name, None, node.lineno, self._depth > 0))
        self.generic_visit(node)


def _internal(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def import_edges(modules: dict[str, Path]) -> tuple[list[Edge], list[str]]:
    """Every edge between modules of the package, and every internal import that names no module (as messages)."""
    edges, unresolved = [], []
    for module, path in modules.items():
        collector = _ImportCollector(module, modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for target, names, line, deferred in collector.found:
            if not _internal(target):
                continue
            if target not in modules:
                unresolved.append(f"{module} line {line}: imports {target!r}, which is no module of {PACKAGE}")
                continue
            if names is None:
                targets = [target]
            else:
                # `from pkg import sub` names the submodule; `from pkg import name` the package's __init__
                targets = sorted({f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names})
            edges.extend(Edge(module, t, line, deferred) for t in targets if t != module)
    return edges, unresolved


@dataclass(frozen=True)
class Cycle:
    """A strongly connected group of modules (each imports, directly or not, every other one) and one shortest
    cycle through it."""

    members: tuple[str, ...]
    path: tuple[Edge, ...]
    edges: tuple[Edge, ...]  # every edge between two members: the ones to cut come from here

    def describe(self) -> str:
        loop = " -> ".join([self.path[0].source, *(e.target for e in self.path)])
        return "\n".join(
            [
                f"cycle: {loop}",
                *(f"    {e.describe()}" for e in self.path),
                f"  {len(self.members)} modules import each other: {', '.join(self.members)}; every edge among them:",
                *(f"    {e.describe()}" for e in self.edges),
            ]
        )


def find_cycles(nodes, edges: list[Edge]) -> list[Cycle]:
    """One `Cycle` for each strongly connected component with more than one module.

    Tarjan's algorithm, iterative (no recursion limit on a large graph)."""
    successors: dict[str, dict[str, Edge]] = {n: {} for n in nodes}
    for edge in edges:
        successors[edge.source].setdefault(edge.target, edge)
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(successors[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [
        Cycle(
            tuple(sorted(component)),
            tuple(_cycle_in(component, successors)),
            tuple(sorted(e for e in set(edges) if e.source in component and e.target in component)),
        )
        for component in components
    ]


def _cycle_in(component: set[str], successors: dict[str, dict[str, Edge]]) -> list[Edge]:
    """A shortest cycle through the component's first module (breadth-first search back to it)."""
    start = min(component)
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child, edge in sorted(successors[node].items()):
                if child not in component:
                    continue
                if child == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_from[path[0].source])
                    return path
                if child not in came_from:
                    came_from[child] = edge
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its strongly connected component {sorted(component)}")


@pytest.fixture(scope="module")
def graph():
    modules = module_files(package_root())
    edges, unresolved = import_edges(modules)
    return modules, edges, unresolved


# ---------------------------------------------------------------------------------------------- the graph builder
def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, text in files.items():
        path = root / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(root / PACKAGE)


def test_builder_resolves_relative_package_and_dynamic_imports(tmp_path):
    modules = _write_package(
        tmp_path,
        {
            "__init__.py": "from .modeling import Model\n",
            "modeling.py": "from . import card\nfrom .methods import get_method\n",
            "card.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .modeling import Model\n"
                "else:\n    from . import version\n"
            ),
            "version.py": "",
            "methods/__init__.py": "import importlib\nimportlib.import_module(f'{__name__}.linear')\n",
            "methods/base.py": "",
            "methods/linear.py": (
                "from . import register_method\nfrom .base import X\n"
                "def later():\n    import importlib\n    importlib.import_module('.base', package=__name__)\n"
                "    return importlib.import_module('hf_align.card')\n"
            ),
            "metrics/acc/acc.py": "from hf_align.metrics import info\nimport hf_align.version\n",
            "metrics/__init__.py": "",
        },
    )
    edges, unresolved = import_edges(modules)
    found = {(e.source, e.target, e.line, e.deferred) for e in edges}
    assert unresolved == []
    assert found == {
        ("hf_align", "hf_align.modeling", 1, False),
        ("hf_align.modeling", "hf_align.card", 1, False),  # `from . import card`: the submodule, not hf_align
        ("hf_align.modeling", "hf_align.methods", 2, False),  # a name from the package __init__
        ("hf_align.card", "hf_align.version", 5, False),  # TYPE_CHECKING import skipped, its else branch kept
        ("hf_align.methods.linear", "hf_align.methods", 1, False),
        ("hf_align.methods.linear", "hf_align.methods.base", 2, False),
        # relative to the module's package (linear.py is no package): hf_align.methods.base, not linear.base
        ("hf_align.methods.linear", "hf_align.methods.base", 5, True),
        ("hf_align.methods.linear", "hf_align.card", 6, True),
        ("hf_align.metrics.acc.acc", "hf_align.metrics", 1, False),
        ("hf_align.metrics.acc.acc", "hf_align.version", 2, False),
    }
    assert find_cycles(modules, edges) == []


def test_builder_reports_a_cycle_path_and_unknown_modules(tmp_path):
    modules = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from .b import x\n",
            "b.py": "def f():\n    from .c import y\n",
            "c.py": "import hf_align.a\nfrom .gone import z\nfrom . import b\n",
            "d.py": "from .a import x\n",  # reaches the cycle but is not on it
        },
    )
    edges, unresolved = import_edges(modules)
    assert unresolved == ["hf_align.c line 2: imports 'hf_align.gone', which is no module of hf_align"]
    (cycle,) = find_cycles(modules, edges)
    assert cycle.members == ("hf_align.a", "hf_align.b", "hf_align.c")
    assert cycle.describe().splitlines() == [
        "cycle: hf_align.a -> hf_align.b -> hf_align.c -> hf_align.a",
        "    hf_align.a -> hf_align.b (line 1, at import time)",
        "    hf_align.b -> hf_align.c (line 2, in a function)",
        "    hf_align.c -> hf_align.a (line 1, at import time)",
        "  3 modules import each other: hf_align.a, hf_align.b, hf_align.c; every edge among them:",
        "    hf_align.a -> hf_align.b (line 1, at import time)",
        "    hf_align.b -> hf_align.c (line 2, in a function)",
        "    hf_align.c -> hf_align.a (line 1, at import time)",
        "    hf_align.c -> hf_align.b (line 3, at import time)",  # a second loop b -> c -> b: listed, not on the path
    ]


# ---------------------------------------------------------------------------------------------- the package
def test_every_internal_import_names_a_module(graph):
    _, _, unresolved = graph
    assert not unresolved, "imports of modules that do not exist:\n" + "\n".join(unresolved)


def test_import_graph_has_no_cycle(graph):
    modules, edges, _ = graph
    cycles = find_cycles(modules, edges)
    if cycles:  # pytest.fail: the message alone, without a repr of every edge
        report = "\n\n".join(cycle.describe() for cycle in cycles)
        pytest.fail(f"{len(cycles)} import cycle(s) in {PACKAGE} (imports must run down the layers):\n{report}")


def test_library_never_imports_the_test_fixtures(graph):
    _, edges, _ = graph
    offending = [
        e.describe()
        for e in edges
        if e.target == TESTING and not any(e.source == m or e.source.startswith(m + ".") for m in MAY_IMPORT_TESTING)
    ]
    assert not offending, f"only {MAY_IMPORT_TESTING} may import {TESTING}:\n" + "\n".join(offending)


def layer_of(module: str) -> int:
    """The index in `LAYERS` of the folder (or top-level module) `module` lives in; the package itself is above all."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} lies in {parts[1]!r}, which is no layer of LAYERS: add it where it belongs")
    return LAYERS.index(parts[1])


def _may_import_testing(edge: Edge) -> bool:
    # the one exception to the order, checked on its own by test_library_never_imports_the_test_fixtures
    return edge.target == TESTING and any(edge.source.startswith(m) for m in MAY_IMPORT_TESTING)


def test_imports_run_down_the_folders(graph):
    modules, edges, _ = graph
    upward = [
        f"{e.describe()}: {LAYERS[layer_of(e.source)]} may not import {LAYERS[layer_of(e.target)]}"
        for e in edges
        if e.source != PACKAGE and layer_of(e.target) > layer_of(e.source) and not _may_import_testing(e)
    ]
    assert not upward, (
        "imports up the layers (folders, bottom to top: " + " < ".join(LAYERS) + "):\n" + "\n".join(upward)
    )
    assert {layer_of(m) for m in modules}  # every module is in a layer (layer_of raises otherwise)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    modules = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "utils/__init__.py": "",
            "utils/checks.py": "from ..model import card\n",
            "model/__init__.py": "",
            "model/card.py": "from ..utils.checks import x\n",
        },
    )
    edges, _ = import_edges(modules)
    assert [(e.source, e.target) for e in edges if layer_of(e.target) > layer_of(e.source)] == [
        ("hf_align.utils.checks", "hf_align.model.card")
    ]


def private_imports(module: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """`from <another module of the package> import _name` statements in `module`: an underscore name stays in
    the module that defines it; what is shared gets a public name there."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _resolve_relative(module, node.level, node.module, modules) if node.level else node.module or ""
        if not _internal(target) or target == module:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{module} line {node.lineno}: imports {alias.name} from {target}")
    return found


def test_no_private_name_crosses_a_module_boundary(graph):
    modules, _, _ = graph
    crossing = [line for name, path in modules.items() for line in private_imports(name, path, modules)]
    assert not crossing, "underscore names imported from another module (give them a public name):\n" + "\n".join(
        crossing
    )


def test_the_private_import_check_catches_one(tmp_path):
    modules = _write_package(
        tmp_path,
        {"__init__.py": "", "a.py": "_x = 1\n", "b.py": "from .a import _x\nfrom .a import __doc__\n"},
    )
    assert private_imports("hf_align.b", modules["hf_align.b"], modules) == [
        "hf_align.b line 1: imports _x from hf_align.a"
    ]


def test_library_code_never_names_a_deprecated_path(graph):
    from hf_align.utils.deprecation import MOVED_MODULES, MOVED_NAMES

    modules, _, _ = graph
    offending = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = _resolve_relative(module, node.level, node.module, modules) if node.level else node.module
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offending += [f"{module} line {node.lineno}: {n}" for n in names if n in MOVED_MODULES or n in MOVED_NAMES]
    assert not offending, "library code using deprecated paths:\n" + "\n".join(offending)


def test_no_module_is_longer_than_the_limit(graph):
    modules, _, _ = graph
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules.items()}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LINE_LIMIT_EXCEPTIONS}
    listing = "\n".join(f"  {name}: {n} lines" for name, n in sorted(too_long.items(), key=lambda kv: -kv[1]))
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job):\n{listing}"
    stale = sorted(name for name in LINE_LIMIT_EXCEPTIONS if lengths.get(name, 0) <= MAX_LINES)
    assert not stale, f"LINE_LIMIT_EXCEPTIONS lists modules that are gone or back under {MAX_LINES} lines: {stale}"
