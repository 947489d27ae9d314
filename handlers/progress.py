"""Handlers that report progress (`qoper8d.progress`), one `"mode"` per way a test uses it.

| action                              | what the handler does                                 |
|-------------------------------------|-------------------------------------------------------|
| `{"mode": "count", "n": n}`         | report 0 .. n-1, return n                             |
| `{"mode": "steps", "path": p}`      | report "started", wait until file p exists, report    |
|                                     | "ending", return "done"                               |
| `{"mode": "flood", "n": n}`         | report 0 .. n-1 in a tight loop; return the seconds   |
| `{"mode": "modules"}`               | report once; the names of the trio modules imported   |
| `{"mode": "bad"}`                   | report what cannot be sent; the exceptions' types     |
| `{"mode": "big", "bytes": n}`       | report nothing, return a string of n bytes            |
| `{"mode": "quiet"}`                 | report nothing, return the action                     |
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from qoper8d import MAX_PROGRESS_BYTES, progress


def handle(action: dict[str, Any]) -> Any:
    mode = action.get("mode", "quiet")
    if mode == "count":
        n = int(action.get("n", 10))
        for i in range(n):
            progress(i)
        return n
    if mode == "steps":
        progress("started")
        while not os.path.exists(action["path"]):
            time.sleep(0.005)
        progress("ending")
        return "done"
    if mode == "flood":
        start = time.perf_counter()
        for i in range(int(action.get("n", 1_000_000))):
            progress(i)
        return time.perf_counter() - start
    if mode == "modules":
        progress("here")
        return sorted(m for m in sys.modules if m == "trio" or m.startswith("trio."))
    if mode == "bad":
        caught = []
        for value in (object(), "x" * MAX_PROGRESS_BYTES):
            try:
                progress(value)
            except Exception as exc:
                caught.append(type(exc).__name__)
        return caught
    if mode == "big":
        return "x" * int(action["bytes"])
    return action


async def handle_async(action: dict[str, Any]) -> Any:
    """The same, from an async handler (its worker runs an event loop)."""
    return handle(action)
