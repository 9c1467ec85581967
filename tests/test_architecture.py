"""Dependencies run one way (docs/architecture.md): each module imports only its own layer and the layers
below, and no imports form a cycle. Parsed with ``ast`` (nothing is imported), so the test takes a second.

A module may import its own layer and the layers below it, except where a layer names fewer (``ONLY``): the
models and their acceleration know nothing of the data pipeline (only the field layout), and serving runs
without the training loop. Module-level imports must follow these rules; imports inside functions (lazy:
they keep ``deepfm --help`` and ``import deepfm`` free of torch) too, apart from the documented exceptions
below. Imports under ``if TYPE_CHECKING:`` are for type checkers only and are skipped. A failure names the
file, the line and both layers of each offending import.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module belongs to the first entry that is its name or a package above it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("deepfm.errors", "deepfm.utils", "deepfm.layout", "deepfm.schema", "deepfm.config",
              "deepfm.outputs", "deepfm.presets", "deepfm.device", "deepfm.calibration",
              "deepfm.train.metrics")),  # numpy metrics (AUC, logloss, ECE): train, serve and calibration use them
    ("data", ("deepfm.data",)),
    ("models", ("deepfm.models",)),
    ("accel", ("deepfm.accel",)),
    ("train", ("deepfm.train",)),
    ("serve", ("deepfm.serve",)),
    ("pipeline", ("deepfm.pipeline", "deepfm.estimator", "deepfm.synth")),
    ("tools", ("deepfm.compare", "deepfm.tune", "deepfm.explain", "deepfm.report")),
    ("commands", ("deepfm.commands", "deepfm.cli", "deepfm.__main__")),
]
# The package itself (``import deepfm``: the errors and the version) sits with the core.
PACKAGE = "deepfm"
# Layers that may import only some of the layers below them.
ONLY: dict[str, tuple[str, ...]] = {
    "models": ("core",),
    "accel": ("core", "models"),
    "serve": ("core", "data", "models", "accel"),
}

# (importer, imported): why a lazy import may point up (or close a cycle). Keep this short.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("deepfm", "deepfm.estimator"): "the package's lazy attribute deepfm.DeepFMClassifier (PEP 562 "
                                    "__getattr__): the facade re-exports the top-level API without importing it",
    ("deepfm.outputs", "deepfm"): "the version for the output marker, read when a marker is written",
}
# Modules outside the commands layer must not import the command-line toolkit.
CLI_ONLY = ("click",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "deepfm").rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file, resolved to a module of ours
    where it is one (``from deepfm import outputs`` -> deepfm.outputs) and kept as written otherwise."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for n in child.orelse:
                    visit(n, top)
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    out.append((sub if sub in modules else mod, child.lineno, top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return out


def allowed(src: str, dst: str) -> bool:
    """Whether module ``src`` may import module ``dst``."""
    a, b = layer_of(src), layer_of(dst)
    return a == b or (b < a and LAYERS[b][0] in ONLY.get(LAYERS[a][0], tuple(n for n, _ in LAYERS[:a])))


def layer_of(module: str) -> int:
    if module == PACKAGE:
        return 0
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py and to "
                         "docs/architecture.md")


def _graph() -> tuple[dict[str, Path], list[tuple[str, str, int, bool]]]:
    modules = _modules()
    edges = []
    for name, path in modules.items():
        for target, line, top in dict.fromkeys(_imports(path, name, set(modules))):  # one per module and line
            edges.append((name, target, line, top))
    return modules, edges


def _where(modules: dict[str, Path], src: str, line: int) -> str:
    return f"{modules[src].relative_to(SRC.parent)}:{line}"


def test_every_module_has_a_layer():
    for name in _modules():
        layer_of(name)


def test_imports_follow_the_layer_order():
    modules, edges = _graph()
    bad = []
    for src, dst, line, top in edges:
        if dst not in modules or (src, dst) in EXCEPTIONS:
            continue
        if not allowed(src, dst):
            kind = "imports" if top else "imports (in a function)"
            why = "a higher layer" if layer_of(dst) > layer_of(src) else "a layer it may not use"
            bad.append(f"{_where(modules, src, line)}: {src} ({LAYERS[layer_of(src)][0]}) {kind} {dst} "
                       f"({LAYERS[layer_of(dst)][0]}), {why}")
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(bad)


def test_the_library_does_not_import_the_command_line_toolkit():
    modules, edges = _graph()
    commands = LAYERS.index(next(x for x in LAYERS if x[0] == "commands"))
    bad = [f"{_where(modules, src, line)}: {src} imports {dst}" for src, dst, line, _ in edges
           if dst.split(".")[0] in CLI_ONLY and layer_of(src) < commands]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules, edges = _graph()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for src, dst, line, _ in edges:
        if dst in modules and dst != src and (src, dst) not in EXCEPTIONS:
            graph[src].setdefault(dst, line)
    cycles = _cycles(graph)
    lines = [" -> ".join(c + [c[0]]) + "  (" + ", ".join(
        _where(modules, a, graph[a][b]) for a, b in zip(c, c[1:] + c[:1], strict=True)) + ")" for c in cycles]
    assert not cycles, "import cycles (each edge with the line that makes it):\n" + "\n".join(lines)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        comps.append(comp)
            elif w not in index:
                index[w] = low[w] = len(index)
                stack.append(w)
                on.add(w)
                work.append((w, iter(graph[w])))
            elif w in on:
                low[v] = min(low[v], index[w])
    return [_one_cycle(graph, set(c)) for c in comps]


def _one_cycle(graph: dict[str, dict[str, int]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), to name concrete edges."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1]
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above are not vacuous: a made-up cycle is caught, and the rules refuse what they should."""
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert allowed("deepfm.train.trainer", "deepfm.data.store")
    assert not allowed("deepfm.data.store", "deepfm.train.trainer")
    assert not allowed("deepfm.models.ctr", "deepfm.data.store"), "the models know only deepfm.layout"
    assert not allowed("deepfm.serve.predictor", "deepfm.train.trainer"), "serving runs without training"
    assert allowed("deepfm.serve.predictor", "deepfm.models.ctr") and allowed("deepfm.compare", "deepfm.report")
