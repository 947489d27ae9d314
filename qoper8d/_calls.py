"""One action for one caller: `pool.run`'s paths past the queue, the idle fast path it and
the socket share, and the path of a call that watches its progress.

On an idle pool a caller writes its action to a worker and reads the answer itself: one task
hop instead of two (the worker's reader would otherwise read it, then wake the caller). The
worker's reader stays parked meanwhile (trio allows one reader per descriptor), which the
engine's `borrowed` flag tells it; if more work lands on the worker, the reader takes over
when the caller leaves. Everything here goes through the engine's public surface.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from qoper8d._channel import read_some
from qoper8d._engine import Engine
from qoper8d._handle import WorkerHandle
from qoper8d._jobs import Job, Waiter, decode_json

__all__ = ["OnProgress", "run_borrowed", "run_watched"]

#: `pool.run`'s `on_progress`: called with each progress value (decoded), may be async.
OnProgress = Callable[[Any], Any]

#: Seconds the idle fast path polls for its answer before it lets other tasks run.
_QUICK_SPIN = 0.00003


class _Watched(Waiter):
    """The sink of a `pool.run` with `on_progress`: its outcome, and the latest progress
    value the caller has not seen yet (coalesced here too: latest wins)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        super().__init__()
        self.value: msgspec.Raw | None = None

    def progress(self, job: Job, value: msgspec.Raw) -> None:
        self.value = value
        self.wake()


async def run_watched(
    engine: Engine, payload: bytes, timeout: float | None, on_progress: OnProgress
) -> Any:
    # Always through the queue: on the idle fast path this task would be reading answers,
    # not running the callback.
    waiter = _Watched()
    job = engine.accept(payload, waiter, None, timeout)
    engine.enqueue(job)
    try:
        while True:
            value = waiter.value
            if value is not None:
                # Before the outcome, so the last value reported is always passed on.
                waiter.value = None
                reported = on_progress(decode_json(value))
                if inspect.isawaitable(reported):
                    await reported
            elif waiter.done:
                break
            else:
                await waiter.wait()
    except BaseException:
        if not waiter.done:
            engine.cancel(job)  # cancelled, or the callback raised: the action goes too
        raise
    await trio.lowlevel.checkpoint()
    return waiter.outcome()


async def run_borrowed(
    engine: Engine,
    worker: WorkerHandle,
    job: Job,
    finished: Callable[[], bool],
    *,
    hand_over: bool = False,
) -> None:
    """Send `job` to `worker` (taken from `engine.borrowable()`) and read the answer here.

    Returns once `finished()` (the job's outcome was delivered) or the worker is gone — or,
    with `hand_over`, once `pool.idle_spin` has passed: the worker's reader then takes over,
    so a task with other duties (a connection's reader) is never held for long.
    """
    worker.borrowed = True
    engine.send(worker, [job], [job.payload])
    # Poll for the answer for up to `pool.idle_spin` seconds, yielding to other tasks
    # between polls, before sleeping in epoll: a trivial action comes back in tens of
    # microseconds, and waking a sleeping master costs about as much again. Only while
    # most answers come that fast: a poll for a 10 ms action is CPU thrown away, which
    # 256 callers of such actions would spend on nothing else.
    spin_until = 0.0
    if engine.quick_share >= 0.5:
        spin_until = time.perf_counter() + engine.idle_spin
        poll = worker.poll
        # A trivial action is answered within about 10 us: poll up to 30 us without
        # leaving this task (a trip around trio's loop costs 7 us here; the pool is idle,
        # so little else can be waiting), each poll giving way to a process waiting for
        # this CPU.
        quick = min(spin_until, time.perf_counter() + _QUICK_SPIN)
        while not poll(0) and time.perf_counter() < quick:
            os.sched_yield()
    try:
        while not finished() and not worker.eof:
            ready = await _readable(worker, spin_until, hand_over, finished)
            if ready is None:
                continue  # finished meanwhile, or the worker is gone: the loop ends
            if not ready:
                if hand_over:
                    return
                spin_until = 0.0  # polled long enough: wait in epoll from now on
                continue
            n = read_some(worker)
            if n is None:
                continue
            if n:
                engine.on_data(worker, n)
            else:
                worker.eof = True
    except trio.ClosedResourceError:
        pass  # the worker exited; the supervisor has delivered what it could
    except BaseException:
        if not finished():
            engine.cancel(job)
        raise
    finally:
        worker.borrowed = False
        if worker.busy:
            worker.reader.wake()


async def _readable(
    worker: WorkerHandle, spin_until: float, hand_over: bool, finished: Callable[[], bool]
) -> bool | None:
    """Whether an answer can be read now: polls (letting other tasks run between polls)
    until `spin_until`, then, without `hand_over`, waits in epoll. False once the polling
    time is up (the caller then hands over, or waits); None if the job finished or the
    worker went meanwhile."""
    if not spin_until:
        if hand_over:
            return False
        await trio.lowlevel.wait_readable(worker.rfd)
        return True
    while not worker.poll(0):
        if time.perf_counter() > spin_until:
            return False
        await trio.lowlevel.checkpoint()
        if finished() or worker.eof:
            return None
    return True
