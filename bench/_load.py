"""Sustained load on a pool, the way Q-Oper8's benchmark made it: keep the queue topped up
and count completions per second over a fixed interval, after a warm-up."""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

import qoper8d


@dataclass(frozen=True)
class Load:
    """What a sustained run did over its measured interval (the warm-up excluded)."""

    #: Actions completed in the interval, errors included.
    done: int
    #: Of which ended with an error (only with `return_exceptions`).
    errors: int
    #: perf_counter() at the start and the end of the interval.
    started: float
    ended: float
    #: The master's CPU seconds over the interval.
    cpu: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def rate(self) -> float:
        return self.done / self.seconds

    @property
    def cpu_per_action(self) -> float:
        return self.cpu / self.done


#: Results between two looks at the clock: rare enough not to cost, often enough to be exact
#: to well under a millisecond at these rates.
_CHECK_EVERY = 256


async def sustained(
    pool: qoper8d.Pool,
    *,
    warmup: float,
    interval: float,
    outstanding: int = 2000,
    return_exceptions: bool = False,
) -> Load:
    """Run trivial actions `{"x": i}` from an endless source through `pool.map`, with up to
    `outstanding` actions queued or running at any time, for `warmup + interval` seconds."""
    source = ({"x": i} for i in itertools.count())
    done = errors = 0
    now = time.perf_counter()
    mark, end = now + warmup, now + warmup + interval
    started = cpu0 = 0.0
    counting = False
    results = pool.map(source, window=outstanding, return_exceptions=return_exceptions)
    async with contextlib.aclosing(results):
        async for r in results:
            done += 1
            if type(r) is not int:
                errors += 1
            if done % _CHECK_EVERY:
                continue
            now = time.perf_counter()
            if not counting and now >= mark:
                counting = True
                started, cpu0 = now, time.process_time()
                done = errors = 0
            elif counting and now >= end:
                break
    return Load(done, errors, started, now, time.process_time() - cpu0)
