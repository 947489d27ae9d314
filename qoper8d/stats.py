"""Frozen snapshots of a pool: what `pool.statistics()` returns, `qoper8ctl status --json`
prints and the monitor logs as `pool.snapshot`. One record, three views, the same fields.
"""

from __future__ import annotations

import msgspec

from qoper8d.wire import DURATION_BOUNDS, ProtocolError, Timed

__all__ = [
    "DURATION_BOUNDS",
    "OUTCOMES",
    "RECENT_EXITS",
    "DurationCounts",
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


_decode_timed = msgspec.json.Decoder(Timed).decode
#: The most nanoseconds (292 years), and actions, one `Timed` frame may count: JSON integers
#: have no bound, and a bigger one could not become a float (`snapshot`, `ActionTime`).
_MAX_NS = 2**63 - 1


class Durations(msgspec.Struct, frozen=True, kw_only=True):
    """How long actions ran on a worker, as counts per bucket of `DURATION_BOUNDS`."""

    #: Actions per bucket (not cumulative): `len(DURATION_BOUNDS) + 1` counts, the last one
    #: for actions longer than every bound (a pool's are always that many, zeros at first).
    counts: tuple[int, ...] = ()
    #: The sum of all timed actions' durations, in seconds.
    total: float = 0.0


#: `ActionTime` remembers about this many actions.
ACTIONS_MEMORY = 100


class ActionTime:
    """Seconds an action takes lately, as the workers time them: each report's mean
    (seconds over actions) moves the estimate as far as its actions weigh against those
    the estimate stands on, at most the last `ACTIONS_MEMORY`."""

    __slots__ = ("_behind", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._behind = 0  # actions the estimate stands on, at most `ACTIONS_MEMORY`

    def add(self, seconds: float, actions: int) -> None:
        """`actions` more ran, `seconds` in all (`actions` > 0)."""
        behind = self._behind
        self.seconds += (seconds / actions - self.seconds) * actions / (actions + behind)
        self._behind = min(behind + actions, ACTIONS_MEMORY)


class DurationCounts:
    """The pool's durations so far: the workers' `Timed` frames, merged as they come (a
    batch's worth of counts at a time, never an action at a time), and how long an action
    takes lately (`recent`: what pacing judges by)."""

    __slots__ = ("counts", "recent", "total_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BOUNDS) + 1)
        self.total_ns = 0
        self.recent = ActionTime()

    def add(self, timed: Timed) -> None:
        """Merge one worker's frame; `ProtocolError` for one no honest worker sends (the
        counts stay as they were)."""
        pairs = timed.counts
        counts = self.counts
        if len(pairs) % 2 or len(pairs) > 2 * len(counts) or not 0 <= timed.total <= _MAX_NS:
            raise ProtocolError(f"a malformed Timed frame: {len(pairs)} counts, {timed.total} ns")
        buckets, actions = pairs[::2], pairs[1::2]
        if not all(0 <= b < len(counts) for b in buckets) or not all(
            0 < n <= _MAX_NS for n in actions
        ):
            raise ProtocolError(f"a Timed frame with counts out of range: {pairs[:20]}")
        for b, n in zip(buckets, actions, strict=True):
            counts[b] += n
        self.total_ns += timed.total
        if actions:
            self.recent.add(timed.total / 1e9, sum(actions))

    def add_frames(self, frames: list[bytes]) -> None:
        """Merge `Timed` frames still undecoded (see `wire.split_timed`)."""
        for frame in frames:
            try:
                timed = _decode_timed(frame)
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            self.add(timed)

    def snapshot(self) -> Durations:
        return Durations(counts=tuple(self.counts), total=self.total_ns / 1e9)


#: How many worker exits a pool remembers for `PoolStatistics.recent_exits`.
RECENT_EXITS = 20


class WorkerExit(msgspec.Struct, frozen=True, kw_only=True):
    """A worker process that ended, as the last few are remembered for operators."""

    #: The slot it ran in.
    slot: int
    #: Its pid.
    pid: int
    #: Its exit code, or the name of the signal that ended it ("SIGKILL"); None if unknown.
    exit: int | str | None
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
    #: The most recent worker exits, oldest first: the last `RECENT_EXITS` (20).
    recent_exits: tuple[WorkerExit, ...] = ()

    @property
    def healthy(self) -> bool:
        """Running, and every slot has a live worker."""
        return self.state == "running" and all(
            w.pid is not None and w.state in ("idle", "busy") for w in self.workers
        )
