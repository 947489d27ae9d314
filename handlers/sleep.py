"""Handlers that wait: a blocking sleep, and an async one for either event loop.

The blocking one imports nothing past the standard library: a module's imports are made once
in each worker (without `pool.preload`), and anyio alone would add ~1.2 MiB to each worker's
private memory (bench/seed.py's 256 sleepers: 3.44 MiB USS a worker with it, 2.3 without).
"""

from __future__ import annotations

import time
from typing import Any


def handle(action: dict[str, Any]) -> dict[str, Any]:
    """Block for `action["seconds"]`, then return the action."""
    time.sleep(float(action.get("seconds", 0)))
    return action


async def handle_async(action: dict[str, Any]) -> dict[str, Any]:
    """Sleep on the worker's event loop (trio or asyncio) for `action["seconds"]`."""
    import anyio  # here, not at the top: only the async handler's workers pay for it

    await anyio.sleep(float(action.get("seconds", 0)))
    return action
