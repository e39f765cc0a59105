"""The package's layers, as docs/architecture.rst draws them: imports only point down.

Read from the source (no import runs): every ``import heksher_shm...`` of a
module must name its own layer or one below it. Imports under
``if TYPE_CHECKING:`` are annotations only and are not counted.
"""

from __future__ import annotations

import ast
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
    frozenset({"status"}),
    frozenset({"clients"}),
    frozenset({"__init__"}),
    frozenset({"cli", "__main__"}),
)
"""Bottom to top: pure model and resolution; shared-memory files; process-wide hooks; the Setting;
the engine with its drivers and transports; status; the clients; the package's face; the command line."""

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
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "heksher_shm":
                found.extend((node.lineno, f"heksher_shm.{alias.name}") for alias in node.names)
            elif node.module.startswith("heksher_shm."):
                found.append((node.lineno, node.module))
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
