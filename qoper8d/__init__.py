"""qoper8d: a trio process-pool supervisor in the spirit of Q-Oper8.

The pool, the clients and the errors are importable from here. Everything but the errors is
imported on first use, so that a worker process (`python -m qoper8d.worker`) pays only for
what it uses: the standard library, msgspec and `qoper8d.wire`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qoper8d.errors import (
    AccessDenied,
    ActionCancelled,
    ActionError,
    ActionTimeout,
    BadRequest,
    BadResult,
    ConfigError,
    ConnectError,
    ConnectTimeout,
    Forbidden,
    HandlerError,
    NotRunning,
    Poisoned,
    PoolClosed,
    PoolError,
    Qoper8Error,
    QueueFull,
    RequestError,
    RestartIntensityExceeded,
    ShuttingDown,
    TooLarge,
    UnknownOp,
    WorkerLost,
    WorkerStartError,
)

if TYPE_CHECKING:
    from qoper8d.client import Client, open_client
    from qoper8d.config import PoolConfig, SupervisorConfig
    from qoper8d.pool import Pool, Session, open_pool
    from qoper8d.stats import PoolStatistics, WorkerStatistics

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "ActionCancelled",
    "ActionError",
    "ActionTimeout",
    "BadRequest",
    "BadResult",
    "Client",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "Forbidden",
    "HandlerError",
    "NotRunning",
    "Poisoned",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolStatistics",
    "Qoper8Error",
    "QueueFull",
    "RequestError",
    "RestartIntensityExceeded",
    "Session",
    "ShuttingDown",
    "SupervisorConfig",
    "TooLarge",
    "UnknownOp",
    "WorkerLost",
    "WorkerStartError",
    "WorkerStatistics",
    "__version__",
    "open_client",
    "open_pool",
]

_LAZY = {
    "open_pool": "qoper8d.pool",
    "Pool": "qoper8d.pool",
    "Session": "qoper8d.pool",
    "PoolConfig": "qoper8d.config",
    "SupervisorConfig": "qoper8d.config",
    "PoolStatistics": "qoper8d.stats",
    "WorkerStatistics": "qoper8d.stats",
    "Client": "qoper8d.client",
    "open_client": "qoper8d.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qoper8d' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
