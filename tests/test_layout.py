"""The code's layout: no import cycle between Veil's modules, and no import hidden inside a function
(except the CLI's, kept lazy for start-up time). Both are read from the source with `ast`, so an
import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAZY_IMPORTS_ALLOWED = {"veil.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def veil_imports(path: Path, modules: set[str]) -> list[tuple[str, int, str | None]]:
    """(imported veil module, line, enclosing function or None) for every import in the file:
    `import veil.x`, `from veil import x`, `from veil.x import y` and the relative forms."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, str | None]] = []

    def target(base: str, member: str) -> str:
        return f"{base}.{member}" if f"{base}.{member}" in modules else base  # a submodule, else the module itself

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, function) for a in child.names if a.name.split(".")[0] == "veil")
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from . import x, from .x import y, from .. import z
                    base = package.rsplit(".", child.level - 1)[0]
                    base = f"{base}.{child.module}" if child.module else base
                else:
                    base = child.module or ""
                if base.split(".")[0] == "veil":
                    found.extend((target(base, a.name), child.lineno, function) for a in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), None)
    return found


def import_graph() -> tuple[dict[str, list[tuple[str, int, str | None]]], dict[str, Path]]:
    paths = {module_name(p): p for p in sorted((SRC / "veil").rglob("*.py"))}
    graph = {name: veil_imports(p, set(paths)) for name, p in paths.items()}
    return graph, paths


def cycles(graph: dict[str, list[tuple[str, int, str | None]]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] through each group of modules that import one another (each strongly
    connected component of more than one module), found breadth-first so that it is a shortest one."""
    edges = {m: sorted({dep for dep, _, _ in deps if dep in graph and dep != m}) for m, deps in graph.items()}
    reach: dict[str, set[str]] = {}

    def reachable(m: str) -> set[str]:
        if m not in reach:
            reach[m], todo = set(), list(edges[m])
            while todo:
                d = todo.pop()
                if d not in reach[m]:
                    reach[m].add(d)
                    todo += edges[d]
        return reach[m]

    found, covered = [], set()
    for m in sorted(graph):
        if m in covered or m not in reachable(m):
            continue
        group = {d for d in reachable(m) if m in reachable(d)} | {m}
        covered |= group
        came_from, todo = {}, [m]  # breadth-first from m, inside the group, until back at m
        while m not in came_from:
            a = todo.pop(0)
            for d in edges[a]:
                if d in group and d not in came_from:
                    came_from[d] = a
                    todo.append(d)
        path = [m]
        while path[-1] != m or len(path) == 1:
            path.append(came_from[path[-1]])
        found.append(path[::-1])
    return found


def test_the_graph_is_read():
    graph, _ = import_graph()
    assert len(graph) >= 20 and "veil.cli" in graph and "veil.defences.noise" in graph
    assert any(dep == "veil.defences.defence" for dep, _, _ in graph["veil.defences.noise"])  # from veil.defences.defence import ...
    assert any(dep == "veil.config" for dep, _, _ in graph["veil.train"])  # from veil import config as config_mod


def test_every_import_form_is_seen(tmp_path, monkeypatch):
    pkg = tmp_path / "veil"
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/c.py"):
        (pkg / name).write_text("")
    (pkg / "sub" / "c.py").write_text("from . import d\nfrom .. import a\nfrom ..b import x\n\ndef f():\n    import veil.a\n")
    (pkg / "a.py").write_text("from veil import b\nfrom veil.sub import c\n\nclass K:\n    def m(self):\n        from veil.sub.c import y\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph, _ = import_graph()
    assert graph["veil.sub.c"] == [("veil.sub", 1, None), ("veil.a", 2, None), ("veil.b", 3, None), ("veil.a", 6, "f")]
    assert graph["veil.a"] == [("veil.b", 1, None), ("veil.sub.c", 2, None), ("veil.sub.c", 6, "m")]
    assert cycles(graph) == [["veil.a", "veil.sub.c", "veil.a"]]


def test_no_import_cycle():
    graph, paths = import_graph()
    report = []
    for cycle in cycles(graph):
        for a, b in zip(cycle, cycle[1:]):
            line, function = next((line, f) for dep, line, f in graph[a] if dep == b)
            report.append(f"  {a} -> {b}  ({paths[a].relative_to(SRC)}:{line}{f', in {function}()' if function else ''})")
        report.append("")
    if report:
        pytest.fail("import cycles:\n" + "\n".join(report), pytrace=False)


def test_no_module_but_the_cli_imports_veil_inside_a_function():
    graph, paths = import_graph()
    hidden = sorted({(str(paths[m].relative_to(SRC)), line, function, dep)
                     for m, deps in graph.items() if m not in LAZY_IMPORTS_ALLOWED for dep, line, function in deps if function})
    if hidden:
        lines = [f"{path}:{line} {function}() imports {dep}" for path, line, function, dep in hidden]
        pytest.fail("veil imports inside functions (move them to the top of the module):\n" + "\n".join(lines), pytrace=False)


# ----------------------------------------------------------------------------- layers (docs/architecture.md)

# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher one.
LAYERS = [
    ("leaves", ["veil.errors", "veil.version", "veil.progress", "veil.io", "veil.metrics", "veil.plots", "veil.signals"]),
    ("models", ["veil.models"]),
    ("defences", ["veil.defences"]),
    ("training core", ["veil.config", "veil.data", "veil.distributed", "veil.runtime", "veil.rundir", "veil.sweepdir", "veil.train", "veil.bench"]),
    ("client", ["veil.client"]),
    ("store", ["veil.store"]),
    ("attack", ["veil.attack"]),
    ("report", ["veil.report"]),
    ("sweep", ["veil.sweep"]),
    ("command line", ["veil.cli", "veil.__main__", "veil"]),
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix naming the module or a package above it."""
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, index = p, i
    if index is None:
        raise KeyError(f"{module} is in no layer of tests/test_layout.py's LAYERS (add it, and to docs/architecture.md)")
    return index


def upward_imports(graph: dict[str, list[tuple[str, int, str | None]]]) -> list[tuple[str, str, int]]:
    """(module, imported module, line) for every import of a higher layer."""
    return sorted({(m, dep, line) for m, deps in graph.items() for dep, line, _ in deps if dep in graph and layer_of(dep) > layer_of(m)})


def test_every_module_has_a_layer():
    graph, _ = import_graph()
    for m in graph:
        layer_of(m)  # raises, naming the module


def test_no_module_imports_a_higher_layer():
    graph, paths = import_graph()
    found = upward_imports(graph)
    if found:
        lines = [f"  {paths[m].relative_to(SRC)}:{line} ({LAYERS[layer_of(m)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})" for m, dep, line in found]
        pytest.fail("imports of a higher layer:\n" + "\n".join(lines), pytrace=False)


def test_an_upward_import_is_caught(tmp_path, monkeypatch):
    pkg = tmp_path / "veil"
    for name in ("__init__.py", "metrics.py", "models/__init__.py", "models/obfuscator.py", "attack/__init__.py", "attack/scoring.py"):
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text("")
    (pkg / "models" / "obfuscator.py").write_text("from veil.metrics import psnr\nfrom veil.attack.scoring import score\n")
    (pkg / "attack" / "scoring.py").write_text("from veil.models.obfuscator import Obfuscator\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph, _ = import_graph()
    assert upward_imports(graph) == [("veil.models.obfuscator", "veil.attack.scoring", 2)]  # down (metrics, models) is fine


def test_the_layers_are_the_documented_ones():
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    for name, prefixes in LAYERS:
        for p in prefixes:
            assert f"`{p.removeprefix('veil.') if p != 'veil' else 'veil'}" in text or f"`{p}" in text, f"{p} ({name}) is not in docs/architecture.md"


# ----------------------------------------------------------------------------- the public API

DOCUMENTED = [  # README, docs/architecture.md and the package docstrings name these
    ("veil", name) for name in __import__("veil").__all__
] + [
    ("veil.defences", "DEFENCES"), ("veil.train", "fork"), ("veil.config", "RESUME_MAY_CHANGE"), ("veil.models", "RECONSTRUCTORS"),
    ("veil.attack", "score"), ("veil.attack", "class_floor_scores"), ("veil.attack", "attack"), ("veil.attack", "AttackConfig"),
    ("veil.report", "report"), ("veil.store.dataset", "open_store"), ("veil.runtime", "feature_maps"),
]


@pytest.mark.parametrize("module, name", DOCUMENTED, ids=[f"{m}.{n}" for m, n in DOCUMENTED])
def test_each_documented_name_imports(module, name):
    mod = __import__(module, fromlist=[name])
    assert getattr(mod, name) is not None
