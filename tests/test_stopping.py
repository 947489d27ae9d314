"""A pool's stop, seen from outside: its `"stopping"` state while workers are still going,
and the warning an operator gets when a worker had to be killed."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio
from structlog.testing import capture_logs

from qoper8d import open_pool
from qoper8d.errors import ActionError

pytestmark = pytest.mark.timeout(60)


async def until(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, looking again every few milliseconds (the pool's
    tasks run in between); the test's deadline fails it. A pool has no event for its state
    or its counts: they are read, as an operator's `status` reads them."""
    while not condition():  # noqa: ASYNC110 (nothing to wait on but the state itself)
        await trio.sleep(0.005)


async def test_a_worker_that_ignores_sigterm_is_killed_with_a_warning_while_the_pool_is_stopping(
    start_method: str,
) -> None:
    outcomes: list[BaseException] = []
    with trio.fail_after(30), capture_logs() as logs:
        async with open_pool(
            "handlers.crash:handle", size=1, start_method=start_method, kill_timeout=0.3
        ) as pool:

            async def stubborn() -> None:
                try:
                    await pool.run({"mode": "ignore_term"})
                except ActionError as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stubborn)
                await until(lambda: pool.statistics().busy == 1)
                (pid,) = [w.pid for w in pool.statistics().workers]
                assert pool.state == "running"
                nursery.start_soon(pool.stop, 0.2)
                # First the grace for the work accepted to finish, then the workers are
                # asked, then made, to go.
                await until(lambda: pool.state != "running")
                assert pool.state == "draining"
                await until(lambda: pool.state != "draining")
                assert pool.state == "stopping"
                assert pid is not None
                os.kill(pid, 0)  # still there: it ignored SIGTERM
            assert pool.state == "stopped"
    assert len(outcomes) == 1, outcomes
    killed = [e for e in logs if e["event"] == "worker.killed"]
    assert len(killed) == 1, logs
    assert killed[0]["log_level"] == "warning"
    assert killed[0]["pid"] == pid
    assert killed[0]["after"] == pytest.approx(0.3)  # pool.kill_timeout after SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
