"""Frozen snapshots of a pool: what `pool.statistics()` returns, `qoper8ctl status --json`
prints and the monitor logs as `pool.snapshot`. One record, three views, the same fields.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "DURATION_BOUNDS",
    "OUTCOMES",
    "Durations",
    "PoolStatistics",
    "WorkerExit",
    "WorkerStatistics",
]

#: Every way an accepted action can end, in the order `status` prints them.
OUTCOMES: tuple[str, ...] = (
    "result",
    "handler_error",
    "bad_result",
    "worker_lost",
    "timeout",
    "cancelled",
    "poisoned",
    "shutting_down",
)

#: Upper bounds, in seconds, of the buckets that count how long actions ran on a worker:
#: powers of two from 4 µs to about 33 s, then one bucket for everything longer.
DURATION_BOUNDS: tuple[float, ...] = tuple(2**k / 1_000_000 for k in range(2, 26))


class Durations(msgspec.Struct, frozen=True, kw_only=True):
    """How long actions ran on a worker, as counts per bucket of `DURATION_BOUNDS`."""

    #: Actions per bucket (not cumulative): `len(DURATION_BOUNDS) + 1` counts, the last one
    #: for actions longer than every bound. Empty until the first action is timed.
    counts: tuple[int, ...] = ()
    #: The sum of all timed actions' durations, in seconds.
    total: float = 0.0


class WorkerExit(msgspec.Struct, frozen=True, kw_only=True):
    """A worker process that ended, as the last few are remembered for operators."""

    #: The slot it ran in.
    slot: int
    #: Its pid.
    pid: int
    #: Its exit code, or the name of the signal that ended it ("SIGKILL").
    exit: int | str
    #: Why it ended: "crash", "timeout", "cancelled", "retired", "stopped", ...
    reason: str
    #: When, in seconds since the epoch.
    at: float


class WorkerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """One slot of the pool and the worker process in it."""

    #: The slot's number, stable across replacements of its worker.
    slot: int
    #: The worker's pid, or None while none is running in the slot.
    pid: int | None
    #: "starting", "idle", "busy", "retiring", "backoff" (waiting to restart) or "stopped".
    state: str
    #: Actions this slot's workers have answered, over every replacement.
    actions_done: int
    #: Times the slot's worker was replaced after a crash (intentional stops excluded).
    restarts: int
    #: Seconds since the current worker reported ready (0 when none is running).
    uptime: float
    #: Resident set size of the worker in bytes, read from /proc (None if unavailable).
    rss_bytes: int | None
    #: Seconds the action now running has been running (None when idle): a hang shows here.
    running_for: float | None
    #: Actions sent to the worker and not yet answered.
    in_flight: int


class PoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The whole pool at one instant."""

    #: "starting", "running", "draining", "stopping", "stopped" or "failed".
    state: str
    #: Slots the pool is configured to keep.
    size: int
    #: Workers running an action now.
    busy: int
    #: Workers ready and waiting for work.
    idle: int
    #: Actions accepted and waiting for a worker.
    queued: int
    #: Bytes of the queued actions (as JSON), bounded by `pool.max_queue_bytes`.
    queued_bytes: int
    #: Actions sent to workers and not yet answered.
    in_flight: int
    #: Actions accepted since the pool started.
    submitted: int
    #: Outcomes so far, by name (see `OUTCOMES`); they add up to `submitted` minus the
    #: actions still queued or in flight.
    outcomes: dict[str, int]
    #: Worker replacements after crashes, over all slots.
    restarts: int
    #: Seconds since the pool started.
    uptime: float
    #: One record per slot, by slot number.
    workers: tuple[WorkerStatistics, ...]
    #: How long actions ran on workers, over the pool's life.
    durations: Durations = Durations()
    #: The most recent worker exits, oldest first (a bounded few).
    recent_exits: tuple[WorkerExit, ...] = ()

    @property
    def healthy(self) -> bool:
        """Running, and every slot has a live worker."""
        return self.state == "running" and all(
            w.pid is not None and w.state in ("idle", "busy") for w in self.workers
        )
