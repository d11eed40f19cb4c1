"""The import graph of Ponder's packages: no cycle, no upward import, pure cores stay pure.

Layers, lowest first: kvstore (the store and its vLLM connector), services (the deployments),
cluster (command line, local cluster, provisioning), bench (benchmarks). A module may import its
own layer and those below. `services/reasoning/` and the store's pure cores import nothing of the
project outside themselves and nothing heavy (no ray, torch or vllm). Imports inside functions count
(they are dependencies too); those under `if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kvstore", "services", "cluster", "bench")
LAYER = {p: i for i, p in enumerate(PACKAGES)}
HEAVY = ("ray", "torch", "vllm", "fastapi", "nixl_cu12", "nixl_cu13", "transformers")
KV_CORE = ("chain", "codec", "core", "cost", "digest", "planner", "ring")  # kvstore's pure modules


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imported(path: Path) -> set[str]:
    """Every absolute module name this file imports, at any depth, outside TYPE_CHECKING blocks."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    g: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for target in imported(path):
            while target and target not in mods:  # `from a.b import c`: c may be a name, not a module
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                g[name].add(target)
    return g


def _reach(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for w in g.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or not (each group sorted, listed once)."""
    reach = {v: _reach(g, v) for v in set(g) | {w for ws in g.values() for w in ws}}
    groups = {tuple(sorted(w for w in reach[v] if v in reach[w])) for v in reach}
    return sorted(list(c) for c in groups if len(c) > 1)


def test_there_is_no_import_cycle():
    assert cycles(graph()) == []


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if LAYER[a.split(".")[0]] < LAYER[b.split(".")[0]]
    ]
    assert upward == []


def _pure(name: str) -> tuple[str, ...] | None:
    """What a pure module may import of the project (None: the module is not one of the pure cores)."""
    if name.startswith("services.reasoning."):
        return ("services.reasoning.",)
    if name in {f"kvstore.{m}" for m in KV_CORE}:
        return tuple(f"kvstore.{m}" for m in KV_CORE)
    return None


def test_pure_cores_import_only_themselves_and_nothing_heavy():
    bad = []
    for name, path in modules().items():
        allowed = _pure(name)
        if allowed is None:
            continue
        for target in imported(path):
            top = target.split(".")[0]
            if (top in PACKAGES and not target.startswith(allowed)) or top in HEAVY:
                bad.append(f"{name} -> {target}")
    assert bad == []
    assert _pure("services.reasoning.tiers") and _pure("kvstore.planner") and not _pure("kvstore.shard.shard")


def test_the_walker_sees_cycles_and_upward_imports():
    """The checks above are not blind: a made-up graph with both is caught."""
    g = {"services.a": {"services.b"}, "services.b": {"services.a", "cluster.x"}}
    assert cycles(g) == [["services.a", "services.b"]]
    assert LAYER["services"] < LAYER["cluster"]
