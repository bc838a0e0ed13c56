"""The floor plan: imports run one way, each module stays one concern."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "scoopy"

# Lowest first: a module may import only modules of lower layers (stdlib and libraries
# aside). The public surface (`__init__`) and the entry points come last.
LAYERS: list[list[str]] = [
    ["errors", "ids", "vocab"],
    ["context", "failure", "postgres"],
    ["deadlines"],
    ["strategy", "message"],
    ["scope"],
    ["saga"],
    ["results", "periodic"],
    ["engine.machine", "engine.queries"],
    ["engine.definition"],
    ["engine.records"],
    ["engine.store"],
    ["engine.topology"],
    ["engine.faults", "engine.eventlog", "engine.handover", "engine.instrument"],
    ["engine.step", "engine.database"],
    ["engine.liveness", "engine.limits"],
    ["engine.runner"],
    ["engine.worker", "engine.waiting", "engine.control", "engine.registry", "engine.migrate"],
    ["engine.background"],
    ["cooperation"],
    ["demo"],
    ["cli"],
    ["engine.__init__"],
    ["__init__", "__main__"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# Entry points that may reach into the engine; everything else goes through Cooperation.
MAY_IMPORT_ENGINE = {"cooperation", "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(module, node, inside a function) of every import of a scoopy module."""
    package = name.split(".")[:-1]
    out: list[tuple[str, ast.stmt, bool]] = []

    def resolve(node: ast.ImportFrom) -> list[str]:
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            module = ".".join([*base, *filter(None, (node.module or "").split("."))])
        elif (node.module or "").split(".")[0] == "scoopy":
            module = (node.module or "").removeprefix("scoopy").removeprefix(".")
        else:
            return []
        found = []
        for alias in node.names:
            candidate = f"{module}.{alias.name}".strip(".")
            if candidate in MODULES:
                found.append(candidate)
            elif module in MODULES:
                found.append(module)
            else:
                found.append(f"{module}.__init__".strip("."))
        return found

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                out.extend((target, child, in_function) for target in resolve(child))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


MODULES: dict[str, Path] = {}
MODULES.update(modules())


def test_every_module_has_a_layer() -> None:
    assert sorted(set(MODULES) - set(RANK)) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name: str) -> None:
    for target, node, _ in imported(name, MODULES[name]):
        assert RANK[target] < RANK[name], (
            f"{name} imports {target} (line {node.lineno}), which is not below it"
        )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_the_entry_points_reach_into_the_engine(name: str) -> None:
    if name.startswith("engine") or name in MAY_IMPORT_ENGINE:
        return
    reached = [t for t, _, _ in imported(name, MODULES[name]) if t.startswith("engine")]
    assert reached == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_local_imports(name: str) -> None:
    local = [node.lineno for _, node, inside in imported(name, MODULES[name]) if inside]
    assert local == []


def test_the_state_machine_does_no_io() -> None:
    names: set[str] = set()
    for node in ast.walk(ast.parse(MODULES["engine.machine"].read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"asyncpg", "anyio", "asyncio", "socket"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small_or_say_why(name: str) -> None:
    source = MODULES[name].read_text()
    if source.count("\n") <= 600:
        return
    docstring = ast.get_docstring(ast.parse(source)) or ""
    assert "600 lines" in docstring, f"{name} has {source.count(chr(10))} lines and no reason"
