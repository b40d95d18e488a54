"""The layering rule of DESIGN.md as a test: imports point down, roles never import each other,
and no import cycle runs through modules.

rollproof -> node, coordinator, trainer -> policy -> envs -> protocol, and p2p beside envs. policy
imports envs on purpose: the warm-up (policy/bootstrap.py) and held-out evaluation
(policy/evaluate.py) train and score the model on a task."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from tests.conftest import REPO_ROOT

# Each package may import itself and the packages listed for it, nothing else.
ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "protocol": frozenset(),
    "envs": frozenset({"protocol"}),
    "p2p": frozenset({"protocol"}),
    "policy": frozenset({"protocol", "envs"}),
    "node": frozenset({"protocol", "envs", "p2p", "policy"}),
    "coordinator": frozenset({"protocol", "envs", "p2p", "policy"}),
    "trainer": frozenset({"protocol", "envs", "policy"}),
    "rollproof": frozenset({"protocol", "envs", "p2p", "policy", "node", "coordinator", "trainer"}),
}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(
    tree: ast.Module, module: str, is_package: bool, modules: set[str], *, top_level_only: bool
) -> set[str]:
    """The project modules a module imports (`from a import b` counts as a.b when that is a
    module, else as a); with top_level_only, only the imports that run when it is imported."""
    package = module if is_package else module.rpartition(".")[0]
    nodes: Iterable[ast.AST] = tree.body if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.add(submodule if submodule in modules else source)
    return names


def import_graph(root: Path, *, top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports, over the packages of ALLOWED_IMPORTS under root."""
    files = {
        _module_name(path, root): path
        for package in ALLOWED_IMPORTS
        if (root / package).is_dir()
        for path in (root / package).rglob("*.py")
    }
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = _imported_modules(
            tree, module, path.name == "__init__.py", set(files), top_level_only=top_level_only
        )
        graph[module] = {name for name in imported if name in files and name != module}
    return graph


def layer_violations(root: Path) -> list[str]:
    graph = import_graph(root)
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if (source_package := module.split(".")[0]) != (target_package := target.split(".")[0])
        and target_package not in ALLOWED_IMPORTS[source_package]
    )


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles among the imports that run at import time (an import inside a function is lazy and
    cannot deadlock module initialisation), found by depth-first search."""
    graph = import_graph(root, top_level_only=True)
    cycles, state = [], {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_every_import_points_down_the_layers():
    assert layer_violations(REPO_ROOT) == []


def test_no_module_import_cycles():
    assert import_cycles(REPO_ROOT) == []


def test_every_project_package_has_a_layer():
    packages = {
        path.parent.name for path in REPO_ROOT.glob("*/__init__.py") if path.parent.name not in {"tests", "bench"}
    }
    assert packages <= set(ALLOWED_IMPORTS), f"packages without a layer: {sorted(packages - set(ALLOWED_IMPORTS))}"


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_an_upward_or_sideways_import_is_reported(tmp_path: Path):
    for package in ("protocol", "policy", "node", "trainer", "coordinator"):
        _write(tmp_path, f"{package}/__init__.py", "")
    _write(tmp_path, "protocol/codec.py", "from coordinator import store\n")
    _write(tmp_path, "policy/model.py", "def load():\n    import trainer.main\n")
    _write(tmp_path, "node/daemon.py", "from protocol import codec\nfrom trainer.main import Trainer\n")
    _write(tmp_path, "trainer/main.py", "from . import sibling\nfrom policy import model\n")
    _write(tmp_path, "trainer/sibling.py", "")
    _write(tmp_path, "coordinator/store.py", "")
    assert layer_violations(tmp_path) == [
        "node.daemon imports trainer.main",
        "policy.model imports trainer.main",
        "protocol.codec imports coordinator.store",
    ]


def test_an_import_cycle_is_reported(tmp_path: Path):
    _write(tmp_path, "protocol/__init__.py", "")
    _write(tmp_path, "protocol/a.py", "from protocol import b\n")
    _write(tmp_path, "protocol/b.py", "import protocol.c\n")
    _write(tmp_path, "protocol/c.py", "from protocol.a import thing\n")
    _write(tmp_path, "protocol/lazy.py", "def f():\n    from protocol import a\n")
    assert import_cycles(tmp_path) == [["protocol.a", "protocol.b", "protocol.c", "protocol.a"]]
