"""A handler with module-level `setup()` and `teardown()`, and one whose setup fails."""

from __future__ import annotations

import os
from typing import Any

_state: dict[str, bool] = {}


def setup() -> None:
    """Runs once in each worker before it reports ready (open connections here)."""
    _state["setup_ran"] = True


def teardown() -> None:
    """Runs on a graceful stop; appends a line to $QOPER8_TEST_TEARDOWN when it is set."""
    path = os.environ.get("QOPER8_TEST_TEARDOWN")
    if path:
        with open(path, "a") as f:
            f.write("teardown\n")


def handle(action: Any) -> dict[str, bool]:
    return dict(_state)
