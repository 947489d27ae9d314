"""The simplest handlers: give the action back, or add one to its "x"."""

from __future__ import annotations

from typing import Any


def handle(action: Any) -> Any:
    """Return the action unchanged."""
    return action


def plus_one(action: dict[str, int]) -> int:
    """The benchmarks' trivial handler: `{"x": i} -> i + 1`."""
    return action["x"] + 1
