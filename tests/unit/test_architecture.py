"""The package's shape: imports point down the layers, no cycle, no module over 500 lines.

Every ``import`` counts, at module level or inside a function; relative imports are resolved.
Layers, lowest first (a module may import its own layer or lower ones, never higher):

    config, schemas, java  <  core  <  encoders  <  stages  <  api, cli, evaluate, train, demo
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "pipeline"
MAX_LINES = 500
LAYERS = [
    ("pipeline.config", "pipeline.schemas", "pipeline.java"),
    ("pipeline.core",),
    ("pipeline.encoders",),
    ("pipeline.stages",),
    ("pipeline.api", "pipeline.cli", "pipeline.evaluate", "pipeline.train", "pipeline.demo", "pipeline.report",
     "pipeline.apply", "pipeline.query", "pipeline.querylight"),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``name`` imports anywhere in its body (parent packages excepted)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    # Importing a submodule runs its parent package's __init__, which imports nothing: ignore parents.
    return {t for t in found if t in known and t != name and not name.startswith(t + ".")}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer_of(name: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return None


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(v: str, path: list[str]) -> list[str] | None:
        state[v] = 1
        for w in sorted(g[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w, path + [w])
                if found:
                    return found
        state[v] = 2
        return None

    for v in sorted(g):
        if v not in state:
            found = visit(v, [v])
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "pipeline" and layer_of(m) is None] == []


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                    if a != "pipeline" and layer_of(b) is not None and layer_of(b) > layer_of(a))
    assert upward == []


def test_no_module_over_500_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checks_can_fail(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("pipeline.core.vectors") < layer_of("pipeline.stages.embed") < layer_of("pipeline.cli")
    module = tmp_path / "x.py"
    module.write_text("from . import y\n\ndef f():\n    from ..core import vectors\n    import pipeline.cli\n")
    known = {"pipeline.stages.y", "pipeline.core.vectors", "pipeline.cli", "pipeline.stages"}
    assert imports_of("pipeline.stages.x", module, known) == {"pipeline.stages.y", "pipeline.core.vectors",
                                                              "pipeline.cli"}
