"""The layout's rules (docs/architecture.md): no import cycle, no module importing another
module's private names, the pure-maths modules free of Flax, library modules of
readable size."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("iresnet_jax", "experiments", "benchmarks")
PURE = ("conv", "lipschitz", "logdet", "inverse", "distributions")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: pathlib.Path) -> list[tuple[str, list[str], ast.AST]]:
    """``(module, names, node)`` for every import of a first-party module in the file,
    wherever it stands (deferred imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node))
    return [(m, n, node) for m, n, node in out if m.split(".")[0] in PACKAGES]


def _targets(module: str, names: list[str]) -> list[str]:
    """The modules an import loads: ``from a import b`` is module ``a.b`` when that is a
    module, else ``a``."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs if subs and len(subs) == len(names) else [module] + subs


def test_no_import_cycle():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names, _ in _imports(path):
            graph[name].update(t for t in _targets(module, names) if t in MODULES)
    # A package's __init__ importing its own submodules is how packages export names;
    # a cycle through it is not one a reader follows.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(
                    stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for module, names, node in _imports(path):
            if isinstance(node, ast.ImportFrom):
                bad += [f"{name}: from {module} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
                for a in node.names:
                    if f"{module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{module}.{a.name}"
            else:
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != name):
                bad.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert bad == []


@pytest.mark.parametrize("pure", PURE)
def test_pure_maths_modules_import_no_flax(pure):
    paths = [p for n, p in MODULES.items() if n == f"iresnet_jax.{pure}"
             or n.startswith(f"iresnet_jax.{pure}.")]
    assert paths
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
                assert not any(n.split(".")[0] == "flax" for n in names), path
                first_party = [n for n in names if n.startswith("iresnet_jax")]
                assert all(any(n == f"iresnet_jax.{p}" or n.startswith(f"iresnet_jax.{p}.")
                               for p in PURE) or n == "iresnet_jax"
                           for n in first_party), (path, first_party)


def test_library_modules_are_of_readable_size():
    sizes = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()
             if n.startswith("iresnet_jax")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
