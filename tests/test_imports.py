"""The import rules of docs/architecture.md, read from the source with ast (nothing is imported or executed):

- trainer/ and index/ import nothing from service/, and neither imports the other;
- no import circle among the modules of trainer/, index/ and service/ (imports executed when a module is
  first imported: its top-level statements, outside ``if TYPE_CHECKING:``);
- the server (service/ except service/console/) never imports service.console;
- the server takes from trainer only what ``trainer.__all__`` declares, as ``from trainer import NAME``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "index", "service")


@dataclass(frozen=True)
class Import:
    """One imported module name as Python resolves it (``import a.b`` -> ``a.b``; ``from a import b`` -> ``a.b``
    when that is a module, else ``a``), with the names taken by a ``from`` import."""

    module: str  # the resolved target (see above)
    source: str  # what the statement names: ``a.b`` for ``import a.b`` and for ``from a.b import c``
    names: tuple[str, ...]  # ``from ... import names``; empty for ``import``
    is_from: bool
    line: int
    top_level: bool  # executed when the importing module is first imported (outside TYPE_CHECKING)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the three packages (a package is its __init__.py)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.stmt], top: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every statement, with whether it runs when the module is first imported: top-level statements, those in
    top-level if/try/with/for/while/match blocks and class bodies do (not the body of ``if TYPE_CHECKING:``);
    those in a function body do not."""
    for node in body:
        yield node, top
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _statements(node.body, False)
        elif isinstance(node, ast.ClassDef):
            yield from _statements(node.body, top)
        elif isinstance(node, ast.If):
            yield from _statements(node.body, top and not _is_type_checking(node.test))
            yield from _statements(node.orelse, top)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _statements(block, top)
        elif isinstance(node, ast.With | ast.AsyncWith | ast.For | ast.AsyncFor | ast.While):
            yield from _statements(node.body, top)
            yield from _statements(getattr(node, "orelse", []), top)
        elif isinstance(node, ast.Match):
            for case in node.cases:
                yield from _statements(case.body, top)


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []
    for node, top in _statements(ast.parse(path.read_text(), str(path)).body, True):
        if isinstance(node, ast.Import):
            out += [Import(a.name, a.name, (), False, node.lineno, top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package, up level - 1
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names = tuple(a.name for a in node.names)
            for name in names:
                target = f"{base}.{name}" if f"{base}.{name}" in MODULES else base
                out.append(Import(target, base, names, True, node.lineno, top))
    return out


def _ours(name: str) -> str | None:
    """The module of the three packages that ``name`` names (the longest known prefix), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _where(module: str, imp: Import) -> str:
    return f"{MODULES[module].relative_to(REPO)}:{imp.line}"


def _server_modules() -> list[str]:
    return [
        m for m in MODULES if m.split(".")[0] == "service" and not (m + ".").startswith("service.console.")
    ]


def test_the_module_list_is_read() -> None:
    for must in (
        "trainer",
        "trainer.artifact",
        "index",
        "index.gallery",
        "service.app",
        "service.console.cli",
    ):
        assert must in MODULES, must
    assert sum(1 for m in MODULES if imports_of(m)) > 30


@pytest.mark.parametrize(
    "pkg, forbidden", [("trainer", ("service", "index")), ("index", ("service", "trainer"))]
)
def test_trainer_and_index_import_nothing_from_the_other_packages(
    pkg: str, forbidden: tuple[str, ...]
) -> None:
    bad = [
        f"{_where(m, imp)} imports {imp.module}"
        for m in MODULES
        if m.split(".")[0] == pkg
        for imp in imports_of(m)
        if imp.module.split(".")[0] in forbidden
    ]
    assert bad == [], f"{pkg}/ must not import {' or '.join(forbidden)}:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for imp in imports_of(m):
            target = _ours(imp.module) if imp.top_level else None
            if target and target != m:
                graph[m].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle closed by a back edge of a depth-first search (iterative), as [a, b, ..., a]. Empty if and
    only if the graph has no cycle."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        colour[root] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = BLACK
                stack.pop()
            elif colour[nxt] == GREY:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif colour[nxt] == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return cycles


def test_find_cycles_finds_a_planted_circle_and_nothing_else() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"b"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}) == [["a", "b", "c", "a"], ["d", "d"]]


def test_no_import_circles() -> None:
    cycles = find_cycles(_graph())
    assert cycles == [], "import circles (module-level imports):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_the_server_never_imports_the_console() -> None:
    bad = [
        f"{_where(m, imp)} imports {imp.module}"
        for m in _server_modules()
        for imp in imports_of(m)
        if (imp.module + ".").startswith("service.console.")
    ]
    assert bad == [], "service/ (outside service/console/) must not import service.console:\n" + "\n".join(
        bad
    )


def _trainer_all() -> set[str]:
    tree = ast.parse(MODULES["trainer"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                return set(ast.literal_eval(node.value))
    raise AssertionError("trainer/__init__.py declares no __all__")


def test_the_server_uses_only_what_trainer_exports() -> None:
    exported = _trainer_all()
    assert {"load_model", "embed_images"} <= exported
    bad = []
    for m in _server_modules():
        for imp in imports_of(m):
            if imp.source.split(".")[0] != "trainer":
                continue
            if not imp.is_from:
                bad.append(f"{_where(m, imp)}: import {imp.source} (use: from trainer import NAME)")
            elif imp.source != "trainer":
                bad.append(f"{_where(m, imp)}: from {imp.source} import ... (use: from trainer import NAME)")
            else:
                bad += [
                    f"{_where(m, imp)}: from trainer import {n} ({n} is not in trainer.__all__)"
                    for n in imp.names
                    if n not in exported
                ]
    assert bad == [], "the server may use only trainer.__all__, via `from trainer import ...`:\n" + "\n".join(
        sorted(set(bad))
    )
