"""The package's shape (docs/ARCHITECTURE.md, "The tree, and the one rule of imports"): no module
imports from a later stage, no import cycles (lazy imports included), and no oversized modules
or classes without a stated reason. Read from the source with ``ast``, so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "diagql"

# Earlier stages first; a module may import from its own stage and earlier ones.
ORDER = ["core", "samplers", "model", "language", "storage", "results", "engine", "evaluate",
         "session", "mnist_demo", "shell"]
CORE = {"diagql", "diagql.errors", "diagql._version", "diagql.progress", "diagql.suggest"}
ENTRY = {"diagql.__main__": "shell"}  # `python -m diagql` is the command line
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250
REASON = "Why this module is long:"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> str:
    if module in CORE:
        return "core"
    if module in ENTRY:
        return ENTRY[module]
    return module.split(".")[1]


def imports(module: str) -> set[str]:
    """Every diagql module this one imports, at the top or inside a function."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from diagql.x import y` imports diagql.x.y when y is a module, else diagql.x.
            names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name.startswith("diagql") and name != module:
                found.add(name)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_belongs_to_a_known_stage():
    unknown = {m: stage(m) for m in MODULES if stage(m) not in ORDER}
    assert not unknown, unknown


def test_no_module_imports_from_a_later_stage():
    upward = [f"{m} ({stage(m)}) imports {i} ({stage(i)})"
              for m, targets in GRAPH.items() for i in sorted(targets)
              if i != "diagql" and ORDER.index(stage(i)) > ORDER.index(stage(m))]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    """Tarjan's strongly connected components over the module graph: every one is a single
    module (the package's own lazy re-exports in diagql/__init__.py are its public surface,
    not a dependency, so it is left out as a target)."""
    graph = {m: {t for t in targets if t != "diagql"} for m, targets in GRAPH.items()}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_the_graph_is_read_correctly():
    """The checks above are only as good as the import reader: known edges must be found."""
    assert "diagql.engine.executor" in GRAPH["diagql.session.connection"]
    assert "diagql.model.layers" in GRAPH["diagql.language.binder"]
    assert "diagql.errors" in GRAPH["diagql.samplers.base"]  # written `from diagql.errors ...`
    assert "diagql.samplers.base" in GRAPH["diagql.samplers.vas"]  # a relative import


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_classes_stay_small(module):
    text = MODULES[module].read_text(encoding="utf-8")
    tree = ast.parse(text)
    docstring = ast.get_docstring(tree) or ""
    if REASON in docstring:
        return
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, \
        f"{module} has {lines} lines; split it, or say at its top '{REASON} ...'"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {module}.{node.name} has {size} lines"
