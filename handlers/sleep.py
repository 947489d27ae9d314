"""Handlers that wait: a blocking sleep, and an async one for either event loop."""

from __future__ import annotations

import time
from typing import Any

import anyio


def handle(action: dict[str, Any]) -> dict[str, Any]:
    """Block for `action["seconds"]`, then return the action."""
    time.sleep(float(action.get("seconds", 0)))
    return action


async def handle_async(action: dict[str, Any]) -> dict[str, Any]:
    """Sleep on the worker's event loop (trio or asyncio) for `action["seconds"]`."""
    await anyio.sleep(float(action.get("seconds", 0)))
    return action
