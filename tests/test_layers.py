"""The package's layers, as docs/architecture.rst draws them: imports only point down.

Read from the source (no import runs):

* every ``import heksher_shm...`` of a module names its own layer or one
  below it (imports under ``if TYPE_CHECKING:`` are annotations only, and
  are not counted here);
* no string names a module of a higher layer either (``sys.modules[...]``,
  ``importlib.import_module(...)`` and lists of module names reach up as
  surely as an import does);
* no modules import each other, in a cycle of any length, counting every
  import: at the top, inside functions, and under ``if TYPE_CHECKING:``;
* no module is over :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "heksher_shm"

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"exceptions", "_version"}),
    frozenset({"_model", "setting_types", "setting_type"}),
    frozenset({"_shm"}),
    frozenset({"_process"}),
    frozenset({"setting", "main_client"}),
    frozenset({"_engine"}),
    frozenset({"status", "_exposition"}),
    frozenset({"clients"}),
    frozenset({"__init__"}),
    frozenset({"openfeature", "metrics"}),
    frozenset({"cli", "__main__"}),
)
"""Bottom to top: pure model and resolution; shared-memory files; process-wide hooks; the Setting;
the engine with its drivers and transports; status and its metric families; the clients; the package's
face; the integrations (optional extras); the command line."""

STANDALONE = frozenset({"testing"})
"""The in-memory service shares no code with the client it stands in for; anything above may use it."""

MAX_LINES = 550
"""No module grows past this without being split along a seam (see docs/architecture.rst)."""


def part_of(module: str) -> str:
    """The layer part a dotted module name belongs to (``heksher_shm._shm.segment`` -> ``_shm``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(part: str) -> int:
    if part in STANDALONE:
        return -1
    for index, layer in enumerate(LAYERS):
        if part in layer:
            return index
    raise AssertionError(f"heksher_shm.{part} is in no layer of tests/test_layers.py: add it")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of each heksher_shm import outside ``if TYPE_CHECKING:`` blocks."""
    return _imports(tree, type_checking=False)


def all_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of each heksher_shm import, ``if TYPE_CHECKING:`` blocks included."""
    return _imports(tree, type_checking=True)


def _imports(tree: ast.Module, type_checking: bool) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "heksher_shm":
                found.extend((node.lineno, f"heksher_shm.{alias.name}") for alias in node.names)
            elif node.module.startswith("heksher_shm."):
                # "from heksher_shm._process import main" imports the module heksher_shm._process.main
                for alias in node.names:
                    submodule = existing_module(f"{node.module}.{alias.name}")
                    found.append((node.lineno, submodule or node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("heksher_shm"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[module_name(p) for p in SOURCES])
def test_imports_point_down(path: Path) -> None:
    source = module_name(path)
    own = part_of(source) if source != "heksher_shm" else "__init__"
    upward = []
    for line, target in runtime_imports(ast.parse(path.read_text())):
        target_part = part_of(target)
        if target_part == "__version__":  # from heksher_shm import __version__
            target_part = "__init__"
        # The standalone part keeps to itself; the others import their own layer or one below.
        ok = target_part in STANDALONE if own in STANDALONE else rank(target_part) <= rank(own)
        if not ok:
            upward.append(f"line {line}: {target}")
    assert not upward, f"{source} imports upward or across: {upward}"


def test_every_part_has_a_layer() -> None:
    parts = {part_of(module_name(p)) if module_name(p) != "heksher_shm" else "__init__" for p in SOURCES}
    for part in parts:
        rank(part)


@pytest.mark.parametrize("path", SOURCES, ids=[module_name(p) for p in SOURCES])
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines: split it along a seam"


MODULE_REFERENCE = re.compile(r"heksher_shm(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
"""A string that starts like a dotted module name of the package."""


def existing_module(dotted: str) -> str | None:
    """The longest prefix of *dotted* that names a module or package of heksher_shm (below the top),
    or None (a logger's name, say: ``heksher_shm.client``)."""
    parts = dotted.split(".")
    while len(parts) > 1:
        path = PACKAGE.parent.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of a module (prose, which may name any module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def string_references(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, module) of each string (not a docstring) that starts with a module name of the package."""
    prose = docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            match = MODULE_REFERENCE.match(node.value)
            module = existing_module(match.group()) if match else None
            if module is not None:
                yield node.lineno, module


@pytest.mark.parametrize("path", SOURCES, ids=[module_name(p) for p in SOURCES])
def test_strings_name_no_higher_layer(path: Path) -> None:
    source = module_name(path)
    own = part_of(source) if source != "heksher_shm" else "__init__"
    upward = []
    for line, target in string_references(ast.parse(path.read_text())):
        target_part = part_of(target)
        ok = target_part in STANDALONE if own in STANDALONE else rank(target_part) <= rank(own)
        if not ok:
            upward.append(f"line {line}: {target!r}")
    assert not upward, f"{source} names a module of a higher layer in a string: {upward}"


def test_a_string_reference_upwards_is_caught() -> None:
    tree = ast.parse(
        '"""Docs may name heksher_shm.clients._base."""\nRESETS = ("heksher_shm.clients._base",)\n'
    )
    assert list(string_references(tree)) == [(2, "heksher_shm.clients._base")]
    assert rank(part_of("heksher_shm.clients._base")) > rank("_process")
    logger = ast.parse('import logging\nlogger = logging.getLogger("heksher_shm.client")\n')
    assert list(string_references(logger)) == []  # a logger's name, not a module


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (every import, TYPE_CHECKING ones included)."""
    modules = {module_name(p) for p in SOURCES}
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        targets = set()
        for _, target in all_imports(ast.parse(path.read_text())):
            resolved = existing_module(target) or target
            if resolved in modules:
                targets.add(resolved)
        graph[module_name(path)] = targets - {module_name(path)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of *graph* (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack = [(start, iter(sorted(graph[start])))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return [*path[path.index(child) :], child]
            elif child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
                on_path.add(child)
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "modules import each other: " + " -> ".join(cycle or [])


def test_a_cycle_through_type_checking_is_caught() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from heksher_shm.setting import Setting\n"
    )
    assert all_imports(tree) == [(3, "heksher_shm.setting")]
    assert runtime_imports(tree) == []
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


CORE = frozenset(
    {
        "answers",
        "context",
        "declaring",
        "effects",
        "engine",
        "follower",
        "health",
        "host",
        "leader",
        "policy",
        "term",
        "updating",
    }
)
"""The engine's core (``heksher_shm._engine.<name>``): the coordination logic, a function of its inputs."""

HOST_MODULES = frozenset({"os", "fcntl", "mmap", "socket", "select", "time", "threading", "uuid", "signal"})
"""What the core must not import: every host operation is an effect a driver performs, the clock a port."""

CORE_MAY_IMPORT = ("heksher_shm._model", "heksher_shm.exceptions", "heksher_shm._engine.")
"""Within the package, the core imports the pure model, the exceptions, and its own core modules."""


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_core_does_no_io(name: str) -> None:
    path = PACKAGE / "_engine" / f"{name}.py"
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "heksher_shm._engine":
            found += [f"heksher_shm._engine.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    host = sorted(m for m in found if m.split(".")[0] in HOST_MODULES)
    assert not host, f"heksher_shm._engine.{name} imports {host}: make it an effect or a port"
    ours = [m for m in found if m.startswith("heksher_shm")]
    outside = [
        m
        for m in ours
        if not m.startswith(CORE_MAY_IMPORT)
        or (m.startswith("heksher_shm._engine.") and m.rsplit(".", 1)[1] not in CORE)
    ]
    assert not outside, f"heksher_shm._engine.{name} imports {outside}, outside the core"
