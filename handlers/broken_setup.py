"""A handler module whose `setup()` raises: workers must never report ready."""

from __future__ import annotations

from typing import Any


def setup() -> None:
    raise RuntimeError("setup failed on purpose")


def handle(action: Any) -> Any:
    return action
