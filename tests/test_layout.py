"""The dependency direction of the package (STYLE.md): imports point down the layers, never up.

``config <- functional <- ops <- nn <- rundir <- {data, train, infer, analysis, hf, spec, bench, ...} <- cli``,
``parallel`` imported only by train and cli, ``train`` never importing analysis / infer / serve, and
``serve`` using infer, never the reverse. Lazy imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moekit"
LEVEL = {"config": 0, "functional": 1, "ops": 2, "nn": 3, "rundir": 4, "runtime": 4, "parallel": 5}
TOP = 6  # every other package (data, train, infer, analysis, hf, spec, bench, compress, serve, ...)
CLI = 9
# (importer, imported) pairs that are refused even though the layers would allow them
FORBIDDEN = {("train", "analysis"), ("train", "infer"), ("train", "serve"), ("infer", "train"),
             ("infer", "serve"), ("analysis", "parallel"), ("infer", "parallel"), ("hf", "parallel"),
             ("data", "parallel"), ("spec", "parallel"), ("bench", "parallel")}
# the package root's public re-exports and `python -m moekit`
EXEMPT = {"__init__", "__main__", "model", "losses"}


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _level(pkg: str) -> int:
    return CLI if pkg == "cli" else LEVEL.get(pkg, TOP)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moekit."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("moekit."))
    return out


def _edges() -> set[tuple[str, str, str]]:
    edges = set()
    for path in SRC.rglob("*.py"):
        pkg = _package(path)
        if pkg in EXEMPT:
            continue
        for dep in _imports(path):
            if dep != pkg:
                edges.add((pkg, dep, str(path.relative_to(SRC))))
    return edges


def test_imports_point_down_the_layers():
    bad = sorted(f"{f}: {a} imports {b}" for a, b, f in _edges()
                 if _level(b) > _level(a) or (a, b) in FORBIDDEN or (_level(a) == _level(b) == LEVEL.get(a, -1)))
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b, _ in _edges():
        graph.setdefault(a, set()).add(b)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    cycles = sorted(p for p in graph if p in reach(p))
    assert not cycles, f"packages on an import cycle: {cycles}"


@pytest.mark.parametrize("literal", ['"config.json"', '"metrics.jsonl"', '"model.safetensors"', '"dcp"',
                                     '"train_config.json"', '"trainer_state.json"', '"train_state.pt"'])
def test_run_directory_file_names_have_one_owner(literal):
    hits = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if literal in p.read_text()]
    assert all(h.startswith(("rundir/", "hf/")) for h in hits), hits


def test_files_and_functions_stay_small():
    long_files = [f"{p.relative_to(SRC)}: {n}" for p in SRC.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 420]
    long_fns = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 70:
                long_fns.append(f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long_files and not long_fns, long_files + long_fns
