"""Layers point down only, and no module imports itself back through others.

Read from the source (the AST of every module under marketflow/, imports inside functions and
``TYPE_CHECKING`` blocks included), so a new upward import or cycle fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "marketflow"

# Modules every layer above the domain may use: the reconnect policy, `async with`, settings,
# log configuration and loop slicing (each of them imports at most the domain).
SHARED = {"backoff", "lifecycle", "settings", "logs", "loop_slices"}
# Which top-level parts of marketflow each part may import (its own part always).
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "backoff": set(),
    "loop_slices": set(),
    "lifecycle": set(),
    "logs": set(),
    "settings": {"domain"},
    "app": {"domain"} | SHARED,
    "adapters": {"domain"} | SHARED,
    # The entrypoints reach adapters only through the composition root.
    "entrypoints": {"domain", "app", "bootstrap"} | SHARED,
    "simulator": {"domain", "adapters"} | SHARED,
    "startup": {"domain", "adapters"} | SHARED,  # what bootstrap opens first
    "bootstrap": {"domain", "app", "adapters", "entrypoints", "startup", "roles"} | SHARED,
    # The Kafka roles (issue 14): composed like bootstrap, one module per role.
    "roles": {"domain", "app", "adapters", "entrypoints", "startup"} | SHARED,
    "__main__": {"entrypoints"},
    "devstack": {"domain", "settings", "simulator", "entrypoints", "logs"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The marketflow modules ``name`` imports (``from pkg import mod`` resolved to mod)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "marketflow")
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import"
            base = node.module or ""
            if base.split(".")[0] != "marketflow":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "marketflow"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "marketflow"))
def test_each_module_imports_only_its_own_layer_or_the_ones_below(name: str) -> None:
    own = part(name)
    assert own in ALLOWED, f"{name}: a new top-level part needs its place in ALLOWED"
    upward = sorted(
        m for m in GRAPH[name] if part(m) != own and part(m) not in ALLOWED[own] | {"marketflow"}
    )
    assert upward == [], f"{name} imports {upward}"


def test_no_import_cycle() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_checks_see_an_upward_import_and_a_cycle() -> None:
    """The AST walk finds what it must (guards against a walk that finds nothing)."""
    assert "marketflow.domain.ticks" in GRAPH["marketflow.domain.feeds"]
    assert "marketflow.bootstrap" in GRAPH["marketflow.entrypoints.cli"]  # inside a function
    assert "marketflow.adapters.fix.dictionary" in GRAPH["marketflow.bootstrap"]
    assert part("marketflow.adapters.feeds.tcp_json") == "adapters"
    assert "app" not in ALLOWED["adapters"]
