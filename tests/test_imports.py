"""The package's import graph: no circles between modules, and nothing imports a layer above its own.

The graph is read from the sources (every ``import`` statement, at module level or inside a function:
a lazy import is still a dependency), with the packages setup.py maps. The layers, bottom up, are
the ones README.md's "Architecture" section describes; a module that fits none fails the test, so a
new module is placed on purpose.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom up. A module belongs to the layer of its longest matching prefix; it may import its own layer and below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("diffrt.kernels",)),
    ("runtime core", ("diffrt.runtime.context", "diffrt.runtime.schedule", "diffrt.runtime.denoiser",
                      "diffrt.runtime.solvers", "diffrt.runtime.sampler", "diffrt.runtime.early_exit",
                      "diffrt.runtime.graphs", "diffrt.runtime.step_cache", "diffrt.runtime.linear_ag",
                      "diffrt.runtime.attention", "diffrt.runtime.deadline", "diffrt.runtime.stream",
                      "diffrt.runtime.stream_faults", "diffrt.runtime.stream_queues",
                      "diffrt.runtime.quality_stats", "diffrt.runtime.conditions", "diffrt.runtime.diffusers_models",
                      "diffrt.runtime.residency", "diffrt.runtime.conditional_graphs")),
    ("export", ("diffrt.export",)),
    ("optimize", ("diffrt.runtime", "diffrt.runtime.optimized", "diffrt.runtime.acceleration",
                  "diffrt.runtime.pipeline", "diffrt.runtime.fused_scheduler")),
    ("reference models", ("diffrt.runtime.models", "diffrt.runtime.quality", "diffrt.runtime.demo")),
    ("tools", ("diffrt.bench",)),
    ("applications", ("diffrt.serve", "diffrt.runtime.cli", "diffrt.bench.load_serve", "diffrt.bench.attacks")),
]


def package_dirs() -> dict[str, Path]:
    """setup.py's ``package_dir`` mapping (package -> folder), read from its source."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_dir":
            return {k: ROOT / v for k, v in ast.literal_eval(node.value).items()}
    raise AssertionError("setup.py has no package_dir")


def modules() -> dict[str, Path]:
    """Every Python module of the installed packages: dotted name -> file."""
    found: dict[str, Path] = {}
    roots = package_dirs()
    for package, folder in roots.items():
        nested = [f for p, f in roots.items() if p != package and f.is_relative_to(folder)]
        for path in folder.rglob("*.py"):
            if any(path.is_relative_to(f) for f in nested):
                continue  # a package of its own (runtime/serve is diffrt.serve)
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _package_attributes(path: Path) -> set[str]:
    """Names a package's ``__init__`` binds to something other than its own submodule (``from .x import f``
    binds f; ``from . import x`` binds the submodule x, which is not counted)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom) and not (node.level == 1 and node.module is None):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _resolve(mods: dict[str, Path], source: str, name: str) -> str | None:
    """The module ``from source import name`` depends on (None: not a diffrt source module, e.g. ``_C``)."""
    if source not in mods:
        return None
    is_package = mods[source].name == "__init__.py"
    if is_package and name in _package_attributes(mods[source]):
        return source
    if f"{source}.{name}" in mods:
        return f"{source}.{name}"
    if not is_package or "__getattr__" in _package_attributes(mods[source]):
        return source
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the diffrt modules it imports (``from pkg import name``: pkg when its ``__init__`` binds
    name, else the submodule pkg.name; a compiled extension such as ``_C`` is not a source module)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets.update(t for t in (_resolve(mods, source, a.name) for a in node.names) if t is not None)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), level)
    return None if best is None else best[1]


def test_the_graph_sees_the_packages_and_their_imports():
    graph = import_graph()
    assert {"diffrt.runtime.sampler", "diffrt.kernels.registry", "diffrt.export.quant", "diffrt.serve.engine",
            "diffrt.bench.benchmark", "diffrt.runtime.solvers.dpm"} <= set(graph)
    assert "diffrt.runtime.denoiser" in graph["diffrt.runtime.sampler"]
    assert "diffrt.runtime.solvers.registry" in graph["diffrt.runtime.solvers.dpm"]
    assert "diffrt.kernels" in graph["diffrt.runtime.sampler"]  # `from diffrt.kernels import solver_step`
    assert "diffrt.export" in graph["diffrt.runtime.optimized"]  # a lazy import counts too


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    found = cycles(graph)
    described = ["; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found]
    assert not found, "import circles:\n" + "\n".join(described)


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and README's Architecture): {unplaced}"
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_the_runtime_holds_no_tools():
    runtime = [m for m in modules() if m.startswith("diffrt.runtime.")]
    tools = [m for m in runtime if m.rsplit(".", 1)[-1] in ("benchmark", "tune", "zoo", "harness", "bench_report")]
    assert not tools, f"benchmark / tuning modules belong in diffrt.bench (bench/): {tools}"


def test_readme_names_no_path_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text, "README.md refers to a path outside the repository"
