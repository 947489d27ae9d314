"""qoper8d: a trio process-pool supervisor in the spirit of Q-Oper8.

The pool, the clients and the errors are importable from here. Everything but the errors is
imported on first use, so that a worker process (`python -m qoper8d.worker`) pays only for
what it uses: the standard library, msgspec and `qoper8d.wire`.

The house, from the top floor down. A module imports only from its own floor or below
(never in a circle, `TYPE_CHECKING` imports included), and no module but this one imports
the package itself; `tests/test_layers.py` reads this table and holds the code to it.

| floor | modules | what they hold |
|---|---|---|
| 1 | `__main__` `cli` | the command lines, qoper8d and qoper8ctl |
| 2 | `daemon` `ctl` | the service in one trio run; qoper8ctl's commands |
| 2 | `_submit` | qoper8ctl submit's stream: NDJSON in, results in order out, a bar |
| 3 | `control` `_http` | the control socket's server and its ops; the operators' HTTP |
| 4 | `_node` | a cluster node: submits into the shared stream, its entries onto the pool |
| 4 | `_connection` | one client of the socket, as the server sees it |
| 4 | `client` `_aclient` | the clients: blocking, async (anyio) |
| 4 | `_protocol` `_ops` `_connect` | their sans-IO protocol; each op once; finding the socket |
| 5 | `pool` | open_pool() and Pool: the API over the engine and the supervisor |
| 5 | `_submits` | a cluster node's front: its clients' submits into the stream, answered |
| 5 | `_link` | a node's connection to Redis, reconnecting with backoff |
| 6 | `_supervise` | slots: start, watch, replace and stop workers |
| 6 | `_classic` `_map` `_calls` | Q-Oper8's API and sessions; map; run |
| 7 | `_engine` | the lifecycle, the queue, dispatch, answers |
| 8 | `_outcomes` `_pacer` `_channel` | endings without a result; pacing; a worker's pipe |
| 9 | `_handle` `_jobqueue` | one worker as the master sees it; the pure queue |
| 10 | `_jobs` `_process` | jobs and sinks; worker processes, the fork server |
| 11 | `config` `monitor` `stats` | settings; logs and snapshots; statistics records |
| 11 | `_metrics` | statistics as Prometheus metrics |
| 11 | `wire` `errors` `_version` | the channel's frames; the error tree; the version |
| 11 | `_policy` `_fds` `_socketfile` | restart policy; descriptors; the socket's file |
| 11 | `_output` `_wakeup` | workers' output; a task parked for sync code to wake |
| 11 | `_chunks` | output waiting as byte chunks, sent a prefix at a time |
| 11 | `_streams` | the cluster's keys, entry and reply formats, Lua scripts |
| 11 | `_systemd` | readiness, the watchdog and the socket systemd hands over |
| 11 | `_console` | log events for people: short lines, blocks, no raw control characters |
| 11 | `_window` | how many of a map's submits are in flight: fixed, or learnt |
| worker | `worker` `zygote` | the child processes: stdlib, msgspec, setproctitle, wire, errors |
| worker | `_check` | --check-config's throwaway worker: a worker's start, setup included |
| worker | `_report` | what a worker reports besides results: durations, progress, errors |
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
    Unavailable,
    UnknownOp,
    WorkerLost,
    WorkerStartError,
)

if TYPE_CHECKING:
    from qoper8d._report import progress
    from qoper8d.client import Client, open_client
    from qoper8d.config import PoolConfig, SupervisorConfig
    from qoper8d.pool import Pool, Session, open_pool
    from qoper8d.stats import PoolStatistics, WorkerStatistics
    from qoper8d.wire import MAX_PROGRESS_BYTES

from qoper8d._version import __version__

__all__ = [
    "MAX_PROGRESS_BYTES",
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
    "Unavailable",
    "UnknownOp",
    "WorkerLost",
    "WorkerStartError",
    "WorkerStatistics",
    "__version__",
    "open_client",
    "open_pool",
    "progress",
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
    # A worker's module: a handler importing it imports no trio.
    "progress": "qoper8d._report",
    "MAX_PROGRESS_BYTES": "qoper8d.wire",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qoper8d' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
