"""The package's layers import one way (DESIGN.md): config <- model <- distributed <- checkpoint / data <- train
<- cli, with no import cycle between modules; and importing the config (so `train --help`) needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "qwen3_pretrain"

# Module prefix -> layer; the longest matching prefix wins.
LAYER_OF = {
    f"{PACKAGE}.config": "config",
    f"{PACKAGE}.model": "model",
    f"{PACKAGE}.distributed": "distributed",
    f"{PACKAGE}.tokenizer": "data",
    f"{PACKAGE}.data": "data",
    f"{PACKAGE}.checkpoint": "checkpoint",
    f"{PACKAGE}.train": "train",
    f"{PACKAGE}.cli": "cli",
    f"{PACKAGE}.demo": "cli",
    f"{PACKAGE}.demo_corpus": "cli",
    PACKAGE: "cli",
}
# Layer -> the layers its modules may import (its own included).
ALLOWED = {
    "config": {"config"},
    "model": {"config", "model"},
    "distributed": {"config", "model", "distributed"},
    "data": {"config", "data"},
    "checkpoint": {"config", "model", "distributed", "data", "checkpoint"},
    "train": {"config", "model", "distributed", "data", "checkpoint", "train"},
    "cli": {"config", "model", "distributed", "data", "checkpoint", "train", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every module of the package that `path` imports, anywhere in the file (function bodies too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            base = node.module or ""
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def layer(module: str) -> str:
    prefix = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len)
    return LAYER_OF[prefix]


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} ({layer(a)}) imports {b} ({layer(b)})"
        for a, targets in graph.items() for b in targets if layer(b) not in ALLOWED[layer(a)]
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_has_a_layer() -> None:
    graph = import_graph()
    assert len(graph) > 30
    assert {layer(m) for m in graph} == set(ALLOWED)


def test_layers_import_one_way() -> None:
    assert upward_edges(import_graph()) == []


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_the_checks_catch_an_upward_edge_and_a_cycle() -> None:
    graph = import_graph()
    upward = {**graph, f"{PACKAGE}.model.qwen3": graph[f"{PACKAGE}.model.qwen3"] | {f"{PACKAGE}.checkpoint.hf"}}
    assert upward_edges(upward) == [
        f"{PACKAGE}.model.qwen3 (model) imports {PACKAGE}.checkpoint.hf (checkpoint)"
    ]
    cyclic = {**graph, f"{PACKAGE}.config.model": {f"{PACKAGE}.config.train"}}
    assert find_cycle(cyclic) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_inside_functions_count() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.train.preflight" in graph[f"{PACKAGE}.train.cli"]  # imported in main(), past --help
    assert f"{PACKAGE}.config.model" in graph[f"{PACKAGE}.model.qwen3"]


@pytest.mark.parametrize(
    "code",
    [
        "import qwen3_pretrain.config",
        "from qwen3_pretrain.train.cli import main; main(['--help'])",
    ],
)
def test_config_and_train_help_do_not_import_torch(code: str) -> None:
    check = f"import sys, contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n    {code}\n" \
            "assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
