"""A handler module whose `setup()` raises SystemExit: the worker exits before it can say
why, so each worker's start fails on its own (`exited before it was ready`)."""

from __future__ import annotations

import sys
from typing import Any


def setup() -> None:
    sys.exit(3)


def handle(action: Any) -> Any:
    return action
