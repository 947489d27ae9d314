"""Says which process imported it: the worker itself, or the fork server (`pool.preload`)."""

from __future__ import annotations

import os
from typing import Any

IMPORTED_IN = os.getpid()


def handle(action: Any) -> tuple[int, int]:
    return IMPORTED_IN, os.getpid()
