"""An async handler written for trio (it calls `trio.sleep`): it cannot run when
`pool.async_backend = "asyncio"`, and `--check-config` says so."""

from __future__ import annotations

from typing import Any

import trio
import trio.lowlevel


async def handle(action: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return action
