"""The house keeps its shape: every module on the floor the package docstring gives it, no
import running up the table or in a circle (`TYPE_CHECKING` imports included), the child
processes importing only what their allow-list names, and no module past 600 lines.

The table is read from `qoper8d.__doc__`, so the documentation and the check cannot drift.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import qoper8d

PACKAGE = Path(qoper8d.__file__).parent
#: What the worker and the fork server may import, besides the standard library.
CHILD_ALLOWED = {
    "msgspec",
    "setproctitle",
    "qoper8d.wire",
    "qoper8d.errors",
    "qoper8d._version",
}
#: What the children import as the package itself: its face, run before any submodule.
CHILDREN = {"worker", "zygote", "_check", "_report"}


def floors() -> dict[str, int | str]:
    """Each module's floor, from the docstring's table (`worker` for the children)."""
    out: dict[str, int | str] = {}
    for row in re.findall(r"^\| (\d+|worker) \| (.+?) \|", qoper8d.__doc__ or "", re.M):
        floor: int | str = int(row[0]) if row[0].isdigit() else row[0]
        for name in re.findall(r"`(\w+)`", row[1]):
            out[name] = floor
    return out


def imports(module: str) -> set[str]:
    """Every module a module imports, at run time or for type checking alike."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "qoper8d":
                # A submodule by the package's name, or a name of the package face itself.
                for alias in node.names:
                    is_module = (PACKAGE / f"{alias.name}.py").exists()
                    found.add(f"qoper8d.{alias.name}" if is_module else "qoper8d")
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def internal(module: str) -> set[str]:
    """The package's modules a module imports (`__init__` for the package itself)."""
    out = set()
    for name in imports(module):
        if name == "qoper8d":
            out.add("__init__")
        elif name.startswith("qoper8d."):
            out.add(name.split(".")[1])
    return out - {module}


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_floor() -> None:
    placed = floors()
    assert set(MODULES) - {"__init__"} == set(placed), "place every module in the table"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "__init__"])
def test_no_import_runs_up_the_table(module: str) -> None:
    placed = floors()
    floor = placed[module]
    for target in internal(module):
        assert target != "__init__", f"{module} imports the package face; import the module"
        if floor == "worker" or placed[target] == "worker":
            continue  # the children's own rule, below
        assert isinstance(floor, int)
        target_floor = placed[target]
        assert isinstance(target_floor, int)
        assert target_floor >= floor, f"{module} (floor {floor}) imports {target} ({target_floor})"


def test_no_circle() -> None:
    graph = {m: internal(m) - {"__init__"} for m in MODULES if m != "__init__"}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                loop = [*path[path.index(target) :], target]
                pytest.fail(f"import circle: {' -> '.join(loop)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(CHILDREN))
def test_the_children_import_only_their_allow_list(module: str) -> None:
    for name in imports(module):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or name in CHILD_ALLOWED or name == f"qoper8d.{module}":
            continue
        if name in {f"qoper8d.{child}" for child in CHILDREN}:
            continue  # the fork server runs the worker's code in its children
        # An async handler's worker runs its event loop (imported only then).
        assert top in ("trio", "asyncio"), f"{module} imports {name}"
        assert module == "worker", f"{module} imports {name}"


def test_no_module_past_600_lines() -> None:
    long = {
        m: n for m in MODULES if (n := len((PACKAGE / f"{m}.py").read_text().splitlines())) > 600
    }
    assert long == {}, "split these modules"
