"""The package's architecture, enforced: packages by layer, imports only downward, no import cycles,
no module name twice, no package hidden by a function of the same name (see docs/architecture.md).

Every import counts, at module level, inside a function or under ``TYPE_CHECKING``: an upward import
deferred into a function is still an upward dependency, and a cycle hidden that way is still a cycle.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
from collections.abc import Iterator

import pytest

import introspect

PACKAGE = pathlib.Path(introspect.__file__).parent
REPO = PACKAGE.parent

# Highest first: a module may import from its own layer or any layer after it, never before it.
LAYERS = ("cli", "integrations", "live", "probes", "analysis", "load", "records", "runtime", "debugger", "leaves")
LEAVES = {"errors", "terminal", "_torch", "_version"}  # modules directly in introspect/ that import nothing of ours
TOP = {"introspect", "introspect.__main__"}  # the public surface and `python -m`: may import any layer


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[1] in LEAVES:
        return "leaves"
    assert parts[1] in LAYERS, f"{module} is in no layer: put it in a package of LAYERS or in LEAVES"
    return parts[1]


def imports_of(module: str, source: str | None = None) -> Iterator[tuple[str, int]]:
    """``(imported introspect module, line)`` for every import in ``module``, wherever it stands."""
    path = MODULES[module]
    tree = ast.parse(source if source is not None else path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno


def graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    sources = sources or {}
    return {
        module: {
            target for target, _ in imports_of(module, sources.get(module)) if target in MODULES and target != module
        }
        for module in MODULES
    }


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in edges.items():
        if module in TOP:
            continue
        for target in targets:
            if target in TOP:
                bad.append(f"{module} imports the top-level package {target}")
            elif LAYERS.index(layer_of(target)) < LAYERS.index(layer_of(module)):
                bad.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)}), a layer above it")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each one cycle or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_a_layer():
    assert upward_imports(graph()) == []


def test_no_import_cycles():
    # A package importing its own submodules (``probes/__init__`` listing the probes) is no cycle
    # as long as no submodule imports the package back.
    assert cycles(graph()) == []


def test_the_check_fails_on_an_upward_import():
    """The test above can fail: one import from live/ added to a records module is caught."""
    victim = "introspect.records.stats"
    source = MODULES[victim].read_text() + "\n\ndef _late():\n    from ..live import watch  # upward\n"
    assert upward_imports(graph({victim: source})) == [
        f"{victim} (records) imports introspect.live (live), a layer above it"
    ]


def test_the_check_fails_on_a_cycle():
    victim = "introspect.runtime.selection"
    source = MODULES[victim].read_text() + "\nfrom .tensors import named_float_tensors\n"
    other = MODULES["introspect.runtime.tensors"].read_text() + "\nfrom .selection import ModuleFilter\n"
    found = cycles(graph({victim: source, "introspect.runtime.tensors": other}))
    assert ["introspect.runtime.selection", "introspect.runtime.tensors"] in found


def test_few_files_directly_in_the_package():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= 8, flat


def test_no_module_name_twice():
    seen: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.stem, []).append(module)
    assert {stem: where for stem, where in seen.items() if len(where) > 1} == {}


def test_no_subpackage_hidden_by_a_public_name():
    """``introspect.watch`` is the function, and no module or package of that name exists to hide."""
    children = {module.split(".")[1] for module in MODULES if module.count(".") >= 1}
    assert children.isdisjoint(introspect.__all__), children & set(introspect.__all__)


_DOTTED = re.compile(r"\bintrospect(?:\.[A-Za-z_]\w*)+")


def _cited_paths() -> set[str]:
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(PACKAGE.rglob("*.py"))]
    return {match.group(0) for text in texts if text.exists() for match in _DOTTED.finditer(text.read_text())}


@pytest.mark.parametrize("dotted", sorted(_cited_paths()))
def test_every_dotted_path_the_docs_cite_resolves(dotted):
    parts = dotted.split(".")
    obj = None
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[i:]:
            obj = getattr(obj, attribute, None) if obj is not None else None
        break
    assert obj is not None, f"{dotted} does not resolve"
