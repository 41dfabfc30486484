"""The package's import graph, imports inside functions included: no cycles, and the layers of
docs/architecture.md "Layers" (nodes -> training -> flash_core; the toy world and the command-line modules are
plugged in by entry points, never imported by the code they drive)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flash_core", "nodes", "training")
# The composition roots: they may import a cli module, and plug the toy world into the training stages.
ENTRY_POINTS = {"training.cli", "training.__main__", "training.toyworld.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "sd35_flash"


def package_modules() -> dict[str, Path]:
    modules = {"sd35_flash": ROOT / "__init__.py"}
    for package in PACKAGES:
        modules.update((module_name(p), p) for p in sorted((ROOT / package).rglob("*.py")))
    return modules


def _targets(modules: dict[str, Path], source: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules one import statement loads (a ``from x import y`` names module ``x.y`` when it is
    one, else ``x``); absolute imports of ``sd35_flash.*`` count as the package's own."""
    if isinstance(node, ast.Import):
        names = [alias.name.split(".") for alias in node.names]
        return {".".join(n[1:] if n[0] == "sd35_flash" else n) for n in names} & modules.keys()
    if node.level:
        here = source.split(".") if modules[source].name == "__init__.py" else source.split(".")[:-1]
        base = here[: len(here) - (node.level - 1)]
    else:
        base = []
    target = [*base, *(node.module.split(".") if node.module else [])]
    if target and target[0] == "sd35_flash":
        target = target[1:]
    stem = ".".join(target) or "sd35_flash"
    submodules = {f"{stem}.{alias.name}" for alias in node.names} & modules.keys()
    names_from_stem = len(submodules) < len(node.names)
    return submodules | ({stem} & modules.keys() if names_from_stem else set())


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(modules, name, node)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "flash_core.text" in graph["flash_core.checkpoint_info"]  # only imported inside a function there
    assert "training.trainer" in graph["nodes.training"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer, may_import", [
    ("flash_core", ("flash_core",)),
    ("training", ("training", "flash_core")),
    ("nodes", ("nodes", "training", "flash_core")),
])
def test_each_layer_imports_only_the_layers_below(layer, may_import):
    for module, targets in import_graph().items():
        if module.split(".")[0] == layer:
            bad = sorted(t for t in targets if t.split(".")[0] not in may_import)
            assert not bad, f"{module} imports {bad}"


def test_training_does_not_import_the_toy_world():
    """The training stages take their dataset from the caller: outside training/toyworld/, only the entry
    points (which plug the toy world in) import it."""
    for module, targets in import_graph().items():
        if module.startswith("training.") and not module.startswith("training.toyworld") \
                and module not in ENTRY_POINTS:
            bad = sorted(t for t in targets if t.startswith("training.toyworld"))
            assert not bad, f"{module} imports {bad}"


def test_only_entry_points_import_a_cli_module():
    for module, targets in import_graph().items():
        if module not in ENTRY_POINTS:
            bad = sorted(t for t in targets if t.split(".")[-1] == "cli")
            assert not bad, f"{module} imports {bad} (only {', '.join(sorted(ENTRY_POINTS))} may)"
