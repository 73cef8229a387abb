"""The layering of docs/design.md, checked on the source: one import root (`dsv3_export`), no import
cycles among its modules, no module importing one above it (or a sibling package of its own layer),
and imports of our modules at module top except where the laziness is the point and says why."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# Bottom to top. Packages in one tuple are siblings: neither imports the other. `server` (the HTTP
# server) and `deploy` (the Triton repository and server) sit just below `cli`: only the CLI's
# `serve` / `bench-serve` / `triton` import them.
LAYERS = (("core",), ("plugins",), ("exporter", "engines"), ("verification", "benchmarks"), ("pipeline",),
          ("server", "deploy"), ("cli",))
PKG = "dsv3_export"  # the one import root; its __init__ is the public API, above every layer
FACADES = {PKG}
# Modules whose function-level imports of our modules are lazy on purpose, and why.
LAZY_BY_DESIGN = {
    f"{PKG}": "the public API: `import dsv3_export` must not load torch, ONNX Runtime and the whole pipeline",
    f"{PKG}.cli.main": "a command loads what it runs: --help and a bad flag answer without loading torch",
    f"{PKG}.exporter": "`import dsv3_export.exporter.names` must not load torch",
    f"{PKG}.engines": "`import dsv3_export.engines` stays light until a build is loaded",
    f"{PKG}.benchmarks.bench": "each measuring child process loads only the system it measures (its peak RSS)",
}
LAZY_MARK = "# lazy:"  # elsewhere, a lazy import of ours carries this comment with its reason


def _modules() -> dict[str, Path]:
    out = {PKG: ROOT / PKG / "__init__.py"}
    for layer in LAYERS:
        for pkg in layer:
            for f in sorted((ROOT / PKG / pkg).rglob("*.py")):
                parts = f.relative_to(ROOT).with_suffix("").parts
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module of ours an imported name lives in (a package's submodule before the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module of ours, node, at module top) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.If) for c in n.body}
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names]  # a submodule, else an attribute of base
        else:
            continue
        for n in names:
            t = _target(n)
            if t is not None and t != module:
                out.append((t, node, id(node) in top))
    return out


def _layer(module: str) -> tuple[int, str]:
    pkg = module.split(".")[1]
    for i, layer in enumerate(LAYERS):
        if pkg in layer:
            return i, pkg
    raise AssertionError(f"{module}: not in any layer of LAYERS")


GRAPH = {m: {t for t, _, _ in _imports(m, p)} for m, p in MODULES.items()}


def test_one_import_root():
    """The repository's only importable top-level package is dsv3_export (tests/ is the suite's),
    and pyproject installs only it."""
    import tomllib

    found = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert found == {PKG}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == [f"{PKG}*"]
    assert pyproject["project"]["scripts"]["dsv3-export"] == f"{PKG}.cli.main:main"


def test_every_package_is_in_a_layer():
    found = {p.parent.name for p in (ROOT / PKG).glob("*/__init__.py")}
    assert found == {pkg for layer in LAYERS for pkg in layer}


def test_no_import_cycles():
    seen, stack, cycles = {}, [], []

    def visit(m):  # depth-first; a back edge to a module on the stack closes a cycle
        seen[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if seen.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = "done"

    for m in sorted(GRAPH):
        if m not in seen:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_one_above_it():
    wrong = []
    for m, targets in GRAPH.items():
        if m in FACADES:
            continue
        (lm, pm) = _layer(m)
        for t in targets:
            lt, pt = _layer(t)
            if lt > lm or (lt == lm and pt != pm) or t in FACADES:
                wrong.append(f"{m} imports {t}")
    assert not wrong, "\n".join(sorted(wrong))


def test_lazy_imports_of_ours_say_why():
    unexplained = []
    for m, path in MODULES.items():
        if m in LAZY_BY_DESIGN:
            continue
        lines = path.read_text().splitlines()
        for t, node, at_top in _imports(m, path):
            if not at_top and LAZY_MARK not in lines[node.lineno - 1]:
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t} inside a function")
    assert not unexplained, "\n".join(sorted(set(unexplained)))


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a module of exporter importing verification is upward."""
    assert _layer(f"{PKG}.exporter.model")[0] < _layer(f"{PKG}.verification.verify")[0]
    assert _target(f"{PKG}.exporter.source.open_source") == f"{PKG}.exporter.source"
    assert _target(f"{PKG}.engines") == f"{PKG}.engines" and _target("numpy") is None
    assert _target("engines") is None  # the old top-level names are not ours any more
