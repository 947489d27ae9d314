"""The simplest handlers: give the action back, or add one to its "x"."""

from __future__ import annotations

from typing import Any


def handle(action: Any) -> Any:
    """Return the action unchanged."""
    return action


def plus_one(action: dict[str, int]) -> int:
    """The benchmarks' trivial handler: `{"x": i} -> i + 1`."""
    return action["x"] + 1


def record(action: dict[str, Any]) -> dict[str, Any]:
    """A result of about 200 bytes, the size of a typical small record: the action back,
    with the fields a lookup would add."""
    return {
        "echo": action,
        "name": "Ada Lovelace",
        "email": "ada@example.org",
        "tags": ["analyst", "engine", "notes"],
        "score": 0.875,
        "active": True,
        "note": "first published algorithm for a machine, 1843",
    }
