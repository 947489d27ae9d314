"""A CPU-bound handler: burns `action["ms"]` milliseconds of processor time."""

from __future__ import annotations

import time
from typing import Any


def handle(action: dict[str, Any]) -> int:
    """Spin until `ms` milliseconds of this process's CPU time have passed; return the spins."""
    end = time.process_time() + float(action.get("ms", 1)) / 1000.0
    spins = 0
    while time.process_time() < end:
        spins += 1
    return spins
