"""Backoff and restart intensity, on trio's autojump clock with fake workers."""

from __future__ import annotations

import itertools
import random

import pytest
import trio
import trio.testing

import qoper8d
from qoper8d import SupervisorConfig, open_pool
from qoper8d._policy import Backoff, RestartIntensity
from tests.fakes import FakeLauncher


def test_backoff_is_zero_then_doubles_with_jitter_up_to_the_cap() -> None:
    cfg = SupervisorConfig(backoff_initial=1.0, backoff_max=8.0, backoff_reset=30.0)
    backoff = Backoff(cfg, random.Random(1))
    delays = [backoff.delay_after_crash(ran_for=1.0) for _ in range(7)]
    assert delays[0] == 0.0
    for delay, base in zip(delays[1:], [1, 2, 4, 8, 8, 8], strict=True):
        assert base / 2 <= delay < base
    # A stable run clears the streak: the next crash is replaced at once.
    assert backoff.delay_after_crash(ran_for=30.0) == 0.0
    assert backoff.streak == 1


def test_intensity_counts_crashes_within_the_window_only() -> None:
    intensity = RestartIntensity(SupervisorConfig(max_restarts=3, restart_window=10.0))
    assert [intensity.record(t) for t in (0.0, 1.0, 2.0)] == [False, False, False]
    assert intensity.record(3.0) is True
    fresh = RestartIntensity(SupervisorConfig(max_restarts=3, restart_window=10.0))
    assert [fresh.record(t) for t in (0.0, 5.0, 10.5, 16.0, 21.0)] == [False] * 5


async def test_a_crashing_slot_backs_off_exponentially(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cfg = SupervisorConfig(
        max_restarts=100, restart_window=1000.0, backoff_initial=1.0, backoff_max=8.0
    )
    async with trio.open_nursery() as fakes:
        # Workers 0-6 crash half a second after they are ready; worker 7 stays.
        launcher = FakeLauncher(fakes, lambda n: (0.5, 1) if n < 7 else (1e9, 0))
        async with open_pool(size=1, supervisor=cfg, launcher=launcher) as pool:
            await launcher.wait_launched(8)
            assert await pool.run({"x": 7}) == 7
            stats = pool.statistics()
            assert stats.restarts == 7
            assert stats.workers[0].state == "idle"
        fakes.cancel_scope.cancel()
    starts = launcher.launched
    # Each worker died 0.5 s after it started; the wait before its replacement:
    waits = [later - earlier - 0.5 for earlier, later in itertools.pairwise(starts)]
    assert waits[0] == pytest.approx(0.0, abs=1e-6)
    for wait, base in zip(waits[1:], [1, 2, 4, 8, 8, 8], strict=True):
        assert base / 2 <= wait < base


async def test_a_stable_run_resets_the_backoff(autojump_clock: trio.testing.MockClock) -> None:
    cfg = SupervisorConfig(max_restarts=100, backoff_initial=1.0, backoff_reset=30.0)
    lifetimes = [0.5, 0.5, 0.5, 40.0, 0.5, 1e9]
    async with trio.open_nursery() as fakes:
        launcher = FakeLauncher(fakes, lambda n: (lifetimes[n], 1))
        async with open_pool(size=1, supervisor=cfg, launcher=launcher):
            await launcher.wait_launched(len(lifetimes))
        fakes.cancel_scope.cancel()
    starts = launcher.launched
    waits = [
        later - earlier - life
        for earlier, later, life in zip(starts, starts[1:], lifetimes, strict=False)
    ]
    assert waits[0] == pytest.approx(0.0, abs=1e-6)
    assert 0.5 <= waits[1] < 1.0
    assert 1.0 <= waits[2] < 2.0  # the streak grew ...
    assert waits[3] == pytest.approx(0.0, abs=1e-6)  # ... until a 40 s run reset it
    assert 0.5 <= waits[4] < 1.0


async def test_restart_intensity_fails_the_pool_loudly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cfg = SupervisorConfig(max_restarts=3, restart_window=10.0, backoff_initial=0.0)
    async with trio.open_nursery() as fakes:
        launcher = FakeLauncher(fakes, lambda n: (0.1, 1) if n else (1e9, 0))
        with pytest.raises(qoper8d.RestartIntensityExceeded, match="more than 3 worker crashes"):
            async with open_pool(size=2, supervisor=cfg, launcher=launcher) as pool:
                await trio.sleep_forever()
        assert pool.state == "failed"
        fakes.cancel_scope.cancel()
    # Slot 1 crashed four times in 0.4 s; slot 0's healthy worker was stopped with it.
    assert len(launcher.launched) == 5


async def test_intentional_stops_are_not_crashes(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as fakes:
        launcher = FakeLauncher(fakes, lambda n: (1e9, 0))
        async with open_pool(size=3, launcher=launcher) as pool:
            assert [await pool.run({"x": i}) for i in range(5)] == list(range(5))
        assert pool.statistics().restarts == 0
        assert pool.state == "stopped"
        fakes.cancel_scope.cancel()
    assert len(launcher.launched) == 3
