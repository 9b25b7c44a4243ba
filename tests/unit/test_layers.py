"""The package's layers: every subpackage imports only from layers below it (imports inside
functions count), so there is no import cycle between subpackages."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[2] / "resilient"
# From the bottom; a unit is a first-level subpackage or module of resilient.
LAYERS = [
    {"errors", "catalogue", "cpus", "heap", "hostcheck"},
    {"rundir"},
    {"runlog"},
    {"config"},
    {"checkpoint"},
    {"training"},
    {"anomaly"},
    {"agents"},
    {"supervisor"},
    {"chaos"},
    {"dashboard"},
    {"launcher"},
    {"cli", "__init__"},
]
LEVEL = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) unit pairs -> where, over every import statement in the package."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base) + "." if node.level else ""
                targets = [prefix + (node.module or "")]
            else:
                continue
            for t in targets:
                if t.startswith("resilient.") and unit_of(t) != unit_of(module):
                    where = f"{rel}.py:{node.lineno} imports {t}"
                    edges.setdefault((unit_of(module), unit_of(t)), []).append(where)
    return edges


def test_every_unit_has_a_layer():
    units = {
        p.stem if p.is_file() else p.name
        for p in ROOT.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").exists())
    }
    assert units <= set(LEVEL), f"place these in LAYERS: {sorted(units - set(LEVEL))}"


def test_imports_go_down_the_layers_only():
    upward = [w for (a, b), where in imports().items() if LEVEL[b] >= LEVEL[a] for w in where]
    assert not upward, "imports of a higher (or the same) layer:\n" + "\n".join(upward)


def test_no_import_cycle_between_subpackages():
    edges = imports()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    seen, stack = set(), []

    def visit(u: str) -> None:
        if u in stack:
            cycle = stack[stack.index(u) :] + [u]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if u in seen:
            return
        stack.append(u)
        for v in graph.get(u, ()):
            visit(v)
        stack.pop()
        seen.add(u)

    for u in list(graph):
        visit(u)
