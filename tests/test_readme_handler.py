"""The README's handler example, as a reader would use it: saved as `handlers/greet.py`, it
passes the checks `make check` runs over `handlers/` (strict mypy, ruff) and runs in a pool.

The block is read out of README.md itself, so the test follows the README; it is written
into a scratch tree (never into this checkout's `handlers/`, which other tests import)."""

from __future__ import annotations

import contextlib
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import qoper8d
from tests.harness import ROOT

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent


def readme_handler() -> str:
    """The README's `handlers/greet.py` code block."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"^```python\n(# handlers/greet\.py .*?)^```$", text, re.M | re.S)
    assert found is not None, "the README's handlers/greet.py example is gone"
    return found[1]


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A tree with the project's tool configuration and the example as handlers/greet.py."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "__init__.py").write_text("")
    (tmp_path / "handlers" / "greet.py").write_text(readme_handler())
    return tmp_path


def test_the_readme_handler_passes_make_check(scratch: Path) -> None:
    """About 1 s with a copy of the checkout's mypy cache (`make test` runs mypy first),
    about 6 s without one."""
    target = "handlers/greet.py"
    cache = ROOT / ".mypy_cache"
    # A copy: the checkout's own mypy may be writing it right now (then: a cold start).
    with contextlib.suppress(OSError):
        shutil.copytree(cache, scratch / ".mypy_cache")
    for command in (
        [str(BIN / "ruff"), "check", target],
        [str(BIN / "ruff"), "format", "--check", target],
        [str(BIN / "mypy"), "--cache-dir", str(scratch / ".mypy_cache"), target],
    ):
        done = subprocess.run(
            command, cwd=scratch, capture_output=True, text=True, timeout=100, check=False
        )
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"


def test_the_db_it_creates_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(
        ["git", "check-ignore", "-q", "people.db"], cwd=ROOT, timeout=30, check=False
    )
    assert done.returncode == 0, "people.db is not git-ignored"


async def test_the_readme_handler_runs_in_a_pool(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(scratch)  # where the workers open people.db, as the README says
    with sqlite3.connect(scratch / "people.db") as people:
        people.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)")
        people.execute("INSERT INTO people VALUES (1, 'Ada')")
    people.close()
    with trio.fail_after(60):
        async with qoper8d.open_pool(
            "handlers.greet:handle", size=1, handler_path=[str(scratch)]
        ) as pool:
            assert await pool.run({"id": 1}) == {"greeting": "hello, Ada"}
            assert await pool.run({"id": 2}) == {"greeting": None}
