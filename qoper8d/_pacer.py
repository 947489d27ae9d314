"""Pacing: the answers of moderately slow actions collected on a shared 5 ms grid.

A worker going through a batch of slow actions answers one at a time, and reading each
answer on its own costs the master a wake-up: 50-100 us of CPU on a small VM, taken from the
workers when they keep every core busy. The answers keep in the pipe, where the worker's
death cannot lose them, so while such a worker has enough work queued behind its running
action its reader hands it to the pacer, which reads every paced worker's answers in one
wake-up every `PACE` seconds and hands a worker back once it should no longer be paced.

Which worker is paced is the engine's rule (`keep`); reading it is the engine's `collect`.

How slow an action is, for this, is what the workers time (`DurationCounts.recent`), not
what the master sees: a worker left waiting for the pacer's tick with its batch done costs
up to `PACE` a batch, so pacing must not mistake fast actions for slow ones. Judged by the
time between the master's reads, it did: an answer read late (a worker's wake-up, the
master preempted or busy starting 20,000 tasks) made a trivial handler look 0.1 ms or
slower, and async maps of 1,000 of them over the socket ran at 72k actions/s instead of
250k (2026-12-04).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import trio

from qoper8d._handle import WorkerHandle
from qoper8d._wakeup import Wakeup

__all__ = ["PACE", "Pacer", "next_tick", "should_pace"]

#: Answers of paced workers are collected at most this often.
PACE = 0.005
#: Actions this slow or slower (and faster than `PACE`) are paced.
PACE_MIN_ACTION = 0.0001


def should_pace(worker: WorkerHandle, action_seconds: float) -> bool:
    """Whether `worker`'s answers may wait for the pacer's next tick, actions taking
    `action_seconds`: only for actions shorter than `PACE` but not fast (fast ones pile up
    between reads anyway; longer ones wake us no more often than the pacer would), only
    while the worker has at least `PACE` of work queued behind the running action (it never
    waits for us: the last answers of a batch are read as they come), and never for a batch
    with a time limit (a deadline runs from the read of the answer before it)."""
    return (
        PACE_MIN_ACTION <= action_seconds < PACE
        and not worker.timed
        and (len(worker.inflight) - worker.pos - 1) * action_seconds >= PACE
    )


def next_tick(now: float) -> float:
    """The first multiple of `PACE` after `now`: the instants are shared by all readers."""
    tick = (now // PACE + 1) * PACE
    return tick if tick > now else tick + PACE  # 0.015 // 0.005 is 2.0 in floats


class Pacer:
    """The paced workers, their parked readers, and the task that reads for them."""

    def __init__(
        self,
        collect: Callable[[WorkerHandle], None],
        keep: Callable[[WorkerHandle], bool],
    ) -> None:
        self._collect = collect
        self._keep = keep
        #: Each paced worker's reader, parked until it is handed back.
        self.paced: dict[WorkerHandle, Wakeup] = {}
        self._idle = Wakeup()

    async def hand_over(self, worker: WorkerHandle) -> None:
        """Park the calling reader while the pacer reads `worker` on its ticks."""
        reader = self.paced[worker] = Wakeup()
        self._idle.wake()
        await reader.wait(partial(self._drop, worker))

    def _drop(self, worker: WorkerHandle) -> None:
        self.paced.pop(worker, None)

    async def serve(self) -> None:
        """The pacer task (the pool starts it with the engine)."""
        paced = self.paced
        while True:
            if not paced:
                await self._idle.wait()
                continue
            await trio.sleep_until(next_tick(trio.current_time()))
            for worker in list(paced):
                if worker not in paced:
                    continue  # its reader was cancelled meanwhile: the worker is gone
                self._collect(worker)
                if worker.eof or not worker.busy or not self._keep(worker):
                    paced.pop(worker).wake()
