"""A handler module whose `setup()` never returns: workers never report ready."""

from __future__ import annotations

import time
from typing import Any


def setup() -> None:
    while True:
        time.sleep(3600)


def handle(action: Any) -> Any:
    return action
