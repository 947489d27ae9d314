"""Answers of slow actions in a batch are collected on the pacer's ticks: on trio's
autojump clock with fake workers, so every instant below is exact."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any

import pytest
import trio
import trio.testing

from qoper8d import Pool, open_pool
from qoper8d._pacer import PACE as _PACE
from tests.fakes import FakeLauncher, FakeWorker

MS = 0.001


@asynccontextmanager
async def fake_pool(**settings: Any) -> AsyncIterator[tuple[Pool, FakeWorker]]:
    """A pool of one fake worker that never exits, and that worker."""
    async with trio.open_nursery() as fakes:
        launcher = FakeLauncher(fakes, lambda n: (1e9, 0))
        async with open_pool(size=1, launcher=launcher, **settings) as pool:
            yield pool, launcher.workers[0]
        fakes.cancel_scope.cancel()


async def received_at(pool: Pool, actions: list[dict[str, Any]]) -> list[float]:
    """Run `actions` through `pool.map`; when each result reached the caller."""
    times: list[float] = []
    async for result in pool.map(actions):
        assert result == actions[len(times)]["x"]
        times.append(trio.current_time())
    return times


async def test_slow_answers_are_collected_on_ticks_and_the_worker_never_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 1 ms actions, about 35 to a batch (max_batch_bytes): six batches for one worker.
    actions = [{"x": i, "seconds": MS} for i in range(200)]
    async with fake_pool(max_batch_bytes=1024) as (pool, worker):
        got = await received_at(pool, actions)
    written = worker.answered_at
    # No answer waits for more than a tick...
    assert all(0 <= got[i] - written[i] <= _PACE + 1e-9 for i in range(200))
    # ... and many answers share one: the master woke far less often than once an answer.
    assert len(set(got)) < len(got) / 2
    # The worker was never left waiting, not even between batches: the last answers of a
    # batch are read as they come and the next batch goes out at once.
    assert all(b - a == pytest.approx(MS) for a, b in pairwise(written))


async def test_a_lone_slow_action_is_answered_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_pool() as (pool, worker):
        await received_at(pool, [{"x": i, "seconds": MS} for i in range(50)])
        for i in range(3):
            await pool.run({"x": i, "seconds": 20 * MS})
            assert trio.current_time() == worker.answered_at[-1]


async def test_batches_with_a_time_limit_are_read_as_answers_come(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A deadline runs from the read of the answer before: those answers are never held.
    async with fake_pool(action_timeout=10.0) as (pool, worker):
        got = await received_at(pool, [{"x": i, "seconds": MS} for i in range(100)])
    assert got == worker.answered_at


async def test_fast_actions_behind_an_answer_read_late_are_not_paced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The first answer of each map comes 2 ms after the send (a worker's wake-up, or the
    # master preempted, on a busy machine), the other 499 every 2 us. Judged by the time
    # between reads, that one read made 2 us actions look 200 us long, slow enough to
    # pace: the worker then finished its batch and waited for the tick (2026-12-04: async
    # maps of 1,000 trivial actions over the socket at 72k/s instead of 250k/s).
    fast = 2e-6
    async with fake_pool() as (pool, worker):
        await received_at(pool, [{"x": i, "seconds": fast} for i in range(500)])
        for _ in range(3):
            before = len(worker.answered_at)
            actions = [{"x": i, "seconds": 2 * MS if i == 0 else fast} for i in range(500)]
            got = await received_at(pool, actions)
            assert got == worker.answered_at[before:]


async def test_slow_actions_after_fast_ones_are_soon_paced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Pacing judges by the worker's timings, which come every `REPORT_INTERVAL` (50 ms) and
    # weigh actions, not reads: after 500 fast actions, two reports of slow ones (100 ms)
    # outweigh them, and from then on answers share ticks.
    async with fake_pool(max_batch_bytes=1024) as (pool, worker):
        await received_at(pool, [{"x": i, "seconds": 2e-6} for i in range(500)])
        got = await received_at(pool, [{"x": i, "seconds": MS} for i in range(400)])
    assert len(set(got[100:])) < 300 / 2
    # ... and the worker still never waited for a tick.
    assert all(b - a == pytest.approx(MS) for a, b in pairwise(worker.answered_at[500:]))
