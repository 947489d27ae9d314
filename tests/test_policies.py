"""Control over running work: timeouts, cancellation, recycling, scaling, graceful stop,
hang visibility, and Q-Oper8's add_to_queue and sessions. Real worker processes."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

import qoper8d
from qoper8d import open_pool
from tests.conftest import descendants

CRASH = "handlers.crash:handle"


class Recorder:
    """A sink for `pool.accept`: keeps every outcome it is given."""

    def __init__(self) -> None:
        self.outcomes: dict[Any, Any] = {}
        self.changed = trio.Event()

    def result(self, job: Any, payload: msgspec.Raw, worker: Any) -> None:
        self.outcomes[job.tag] = msgspec.json.decode(payload)
        self.changed.set()

    def results(self, jobs: list[Any], payloads: list[msgspec.Raw], worker: Any) -> None:
        for job, payload in zip(jobs, payloads, strict=True):
            self.result(job, payload, worker)

    def error(self, job: Any, err: qoper8d.ActionError, worker: Any) -> None:
        self.outcomes[job.tag] = err
        self.changed.set()


# -- timeouts ----------------------------------------------------------------------------------


async def test_a_hung_handler_times_out_and_its_slot_gets_a_new_worker() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool:
            pid = await pool.run({"mode": "pid"})
            with pytest.raises(qoper8d.ActionTimeout) as info:
                await pool.run({"mode": "hang"}, timeout=0.2)
            assert info.value.code == "timeout"
            assert info.value.details["pid"] == pid
            assert await pool.run({"mode": "pid"}) != pid
            stats = pool.statistics()
            assert stats.outcomes["timeout"] == 1
            assert stats.restarts == 0, "a timeout is not a crash"


async def test_a_handler_ignoring_sigterm_is_sigkilled() -> None:
    with trio.fail_after(20), capture_logs() as logs:
        async with open_pool(CRASH, size=1, kill_timeout=0.2) as pool:
            pid = await pool.run({"mode": "pid"})
            with pytest.raises(qoper8d.ActionTimeout):
                await pool.run({"mode": "ignore_term"}, timeout=0.2)
            assert await pool.run({"mode": "pid"}) != pid
    (exit_event,) = [e for e in logs if e["event"] == "worker.exit" and e["pid"] == pid]
    assert exit_event["signal"] == "SIGKILL"
    assert exit_event["reason"] == "timeout"


async def test_a_timeout_requeues_the_rest_of_its_batch_untouched(tmp_path: Path) -> None:
    record = tmp_path / "runs"
    actions = [{"mode": "ok", "id": i, "record": str(record)} for i in range(8)]
    actions[3] = {"mode": "hang", "id": 3, "record": str(record)}
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1, action_timeout=1.0, kill_timeout=0.2) as pool:
            got = [r async for r in pool.map(actions, return_exceptions=True)]
    assert isinstance(got[3], qoper8d.ActionTimeout)
    assert [g["id"] for g in got if isinstance(g, dict)] == [0, 1, 2, 4, 5, 6, 7]
    assert Counter(int(x) for x in record.read_text().split()) == dict.fromkeys(range(8), 1)


# -- cancellation ------------------------------------------------------------------------------


async def test_cancelling_a_queued_call_removes_it() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool, trio.open_nursery() as nursery:
            pid = await pool.run({"mode": "pid"})
            nursery.start_soon(pool.run, {"mode": "hang"})
            await trio.testing.wait_all_tasks_blocked()
            scope = trio.CancelScope()

            async def queued_call() -> None:
                with scope:
                    await pool.run({"mode": "ok"})

            nursery.start_soon(queued_call)
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.in_flight, stats.queued) == (1, 1)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.in_flight, stats.queued) == (1, 0)
            assert stats.outcomes["cancelled"] == 1
            # The running action and its worker were not touched.
            assert stats.workers[0].pid == pid
            assert stats.workers[0].state == "busy"
            nursery.cancel_scope.cancel()


async def test_cancel_of_a_queued_and_of_a_running_action() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool:
            pid = await pool.run({"mode": "pid"})
            sink = Recorder()
            running = pool.accept({"mode": "hang"}, sink, "running")
            pool.enqueue(running)
            queued = pool.accept({"mode": "ok"}, sink, "queued")
            pool.enqueue(queued)
            assert (pool.statistics().in_flight, pool.statistics().queued) == (1, 1)
            pool.cancel(queued)
            assert isinstance(sink.outcomes["queued"], qoper8d.ActionCancelled)
            assert pool.statistics().queued == 0
            pool.cancel(running)
            assert isinstance(sink.outcomes["running"], qoper8d.ActionCancelled)
            # The running action's worker was killed and replaced.
            assert await pool.run({"mode": "pid"}) != pid
            stats = pool.statistics()
            assert stats.outcomes["cancelled"] == 2
            assert stats.restarts == 0


async def test_cancelling_a_running_call_replaces_its_worker() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool:
            pid = await pool.run({"mode": "pid"})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.run, {"mode": "hang"})
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().workers[0].state == "busy"
                nursery.cancel_scope.cancel()
            assert await pool.run({"mode": "pid"}) != pid
            assert pool.statistics().outcomes["cancelled"] == 1


# -- hang visibility ---------------------------------------------------------------------------


async def test_a_long_running_action_shows_its_age_in_statistics() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=2) as pool, trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, {"mode": "hang"})
            await trio.testing.wait_all_tasks_blocked()
            first = [w for w in pool.statistics().workers if w.state == "busy"]
            await trio.sleep(0.05)
            later = [w for w in pool.statistics().workers if w.state == "busy"]
            assert len(first) == len(later) == 1
            assert first[0].running_for is not None
            assert later[0].running_for is not None
            assert later[0].running_for > first[0].running_for
            idle = [w for w in pool.statistics().workers if w.state == "idle"]
            assert [w.running_for for w in idle] == [None]
            nursery.cancel_scope.cancel()


# -- recycling ---------------------------------------------------------------------------------


async def test_recycling_by_count_under_load_fails_nothing() -> None:
    with trio.fail_after(60):
        async with open_pool(CRASH, size=2, max_actions_per_worker=50) as pool:
            pids = [r async for r in pool.map({"mode": "pid", "n": i} for i in range(1000))]
            stats = pool.statistics()
    runs = Counter(pids)
    assert sum(runs.values()) == 1000
    assert max(runs.values()) <= 50
    assert len(runs) >= 20
    assert stats.restarts == 0
    assert stats.outcomes["result"] == 1000


async def test_recycling_by_rss_under_load_fails_nothing() -> None:
    with trio.fail_after(60), capture_logs() as logs:
        async with open_pool(CRASH, size=2, max_worker_rss_mb=80) as pool:
            pids = [r async for r in pool.map({"mode": "memory", "mb": 25} for _ in range(24))]
            stats = pool.statistics()
    assert len(pids) == 24
    # Each worker can hold about three 25 MiB blocks before it passes 80 MiB.
    assert len(set(pids)) >= 6
    assert stats.restarts == 0
    recycles = [e for e in logs if e["event"] == "worker.recycle"]
    assert recycles
    assert all("rss" in e["reason"] for e in recycles)


async def test_one_slot_recycles_at_a_time_and_the_new_worker_is_ready_first() -> None:
    with trio.fail_after(60), capture_logs() as logs:
        async with open_pool(CRASH, size=4, max_actions_per_worker=20) as pool:
            got = [r async for r in pool.map({"mode": "ok", "n": i} for i in range(400))]
    assert len(got) == 400
    # Events in order: a recycle, its replacement ready, then the old worker's exit; the
    # next recycle starts only after that exit.
    order = [
        (e["event"], e.get("slot"))
        for e in logs
        if e["event"] in ("worker.recycle", "worker.ready", "worker.exit")
        and (e["event"] != "worker.exit" or e["reason"] == "retired")
    ]
    recycling = None
    for event, slot in order:
        if event == "worker.recycle":
            assert recycling is None, "two slots recycling at once"
            recycling = ("ready", slot)
        elif event == "worker.ready" and recycling == ("ready", slot):
            recycling = ("exit", slot)
        elif event == "worker.exit":
            assert recycling == ("exit", slot), "the old worker left before its replacement"
            recycling = None


# -- scaling -----------------------------------------------------------------------------------


async def test_scaling_2_to_4_to_1_under_load_fails_nothing() -> None:
    with trio.fail_after(60):
        async with open_pool("handlers.sleep:handle", size=2) as pool:
            results: list[Any] = []

            async def load() -> None:
                actions = ({"seconds": 0.002, "n": i} for i in range(600))
                results.extend([r async for r in pool.map(actions, window=64)])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(load)
                await pool.scale(4)
                stats = pool.statistics()
                assert stats.size == 4
                assert len([w for w in stats.workers if w.pid]) == 4
                first_two = {w.pid for w in stats.workers[:2]}
                await pool.scale(1)
                stats = pool.statistics()
                assert stats.size == 1
                assert len(stats.workers) == 1
            assert [r["n"] for r in results] == list(range(600))
            stats = pool.statistics()
            assert stats.outcomes["result"] == 600
            assert sum(stats.outcomes.values()) == 600
            assert stats.restarts == 0
    # Growing did not touch the workers already there.
    assert first_two <= {r.get("pid") for r in results} | first_two


async def test_scaling_down_waits_for_a_busy_worker_instead_of_killing_it() -> None:
    with trio.fail_after(20):
        async with open_pool("handlers.sleep:handle", size=2) as pool:
            async with trio.open_nursery() as nursery:
                done: list[Any] = []

                async def slow() -> None:
                    done.append(await pool.run({"seconds": 0.3}))

                nursery.start_soon(slow)
                nursery.start_soon(slow)
                await trio.testing.wait_all_tasks_blocked()
                await pool.scale(1)
                # scale() returned once a worker left, after the action it was running.
                assert done
                assert pool.statistics().size == 1
            assert done == [{"seconds": 0.3}, {"seconds": 0.3}]
            stats = pool.statistics()
            assert stats.outcomes["cancelled"] == 0
            assert stats.outcomes["result"] == 2


# -- graceful stop -----------------------------------------------------------------------------


async def test_leaving_the_block_lets_queued_work_finish() -> None:
    finished: list[int] = []

    async def one(pool: qoper8d.Pool, i: int) -> None:
        finished.append((await pool.run({"seconds": 0.01, "i": i}))["i"])

    with trio.fail_after(30):
        async with (
            trio.open_nursery() as nursery,
            open_pool("handlers.sleep:handle", size=2) as pool,
        ):
            for i in range(20):
                nursery.start_soon(one, pool, i)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().queued > 0
    assert sorted(finished) == list(range(20))


async def test_work_left_at_the_grace_deadline_ends_shutting_down() -> None:
    outcomes: dict[int, Any] = {}

    async def one(pool: qoper8d.Pool, i: int) -> None:
        try:
            outcomes[i] = await pool.run({"mode": "ok" if i == 0 else "hang", "i": i})
        except qoper8d.ShuttingDown as exc:
            outcomes[i] = exc

    with trio.fail_after(30):
        async with (
            trio.open_nursery() as nursery,
            open_pool(CRASH, size=1, grace_period=1.0, kill_timeout=0.2) as pool,
        ):
            nursery.start_soon(one, pool, 0)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(1, 10):
                nursery.start_soon(one, pool, i)
            await trio.testing.wait_all_tasks_blocked()
            pids = {w.pid for w in pool.statistics().workers}
        stats = pool.statistics()
    assert sorted(outcomes) == list(range(10)), "every action has exactly one outcome"
    assert outcomes[0] == {"mode": "ok", "i": 0}
    assert all(isinstance(outcomes[i], qoper8d.ShuttingDown) for i in range(1, 10))
    assert stats.outcomes["shutting_down"] == 9
    assert stats.restarts == 0
    assert not (pids & descendants())


async def test_new_submissions_during_a_stop_end_shutting_down() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool:
            await pool.drain()
            with pytest.raises(qoper8d.ShuttingDown):
                await pool.run({"mode": "ok"})
            await pool.stop()
            assert pool.state == "stopped"


# -- Q-Oper8's master-side API -----------------------------------------------------------------


async def test_add_to_queue_keeps_the_request_in_the_master_and_chains_actions() -> None:
    responses: list[tuple[dict[str, Any], Any, int | None]] = []

    with trio.fail_after(20):
        async with open_pool("handlers.echo:plus_one", size=2) as pool:

            def on_response(request: dict[str, Any], result: Any, pid: int | None) -> None:
                responses.append((request, result, pid))
                if result < 5:  # the seed's follow-up actions
                    follow = {"action": {"x": result}, "chain": request["chain"]}
                    pool.add_to_queue(follow, on_response)

            starts: list[dict[str, Any]] = [
                {"action": {"x": 0}, "chain": c, "socket": object()} for c in range(10)
            ]
            for request in starts:
                pool.add_to_queue(request, on_response)
            await pool.drain()
    assert len(responses) == 10 * 5
    for request, result, pid in responses:
        assert result == request["action"]["x"] + 1
        assert isinstance(pid, int)
    firsts = [r for r, result, _ in responses if result == 1]
    # Only the action travelled: the very request objects, socket and all, came back.
    assert sorted(map(id, firsts)) == sorted(map(id, starts))


async def test_add_to_queue_async_callbacks_errors_and_failing_callbacks() -> None:
    seen: list[Any] = []

    async def on_response(request: dict[str, Any], result: Any, pid: int | None) -> None:
        await trio.lowlevel.checkpoint()
        seen.append(result)
        if request.get("explode"):
            raise RuntimeError("callback bug")

    with trio.fail_after(20), capture_logs() as logs:
        async with open_pool(CRASH, size=1) as pool:
            pool.add_to_queue({"action": {"mode": "raise"}}, on_response)
            pool.add_to_queue({"action": {"mode": "ok"}, "explode": True}, on_response)
            pool.add_to_queue({"action": {"mode": "ok", "n": 2}}, on_response)
            await pool.drain()
    assert isinstance(seen[0], qoper8d.HandlerError)
    assert seen[1:] == [{"mode": "ok"}, {"mode": "ok", "n": 2}]
    assert [e["event"] for e in logs if e["event"] == "pool.on_response_failed"] == [
        "pool.on_response_failed"
    ]


async def test_a_session_keeps_one_worker_and_releases_it_after_an_exception() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool:
            seen: list[int] = []

            async def use_and_fail() -> None:
                async with pool.session() as worker:
                    seen.extend([await worker.run({"mode": "pid"}) for _ in range(5)])
                    seen.append(worker.pid)
                    raise ValueError("caller's own bug")

            with pytest.raises(ValueError, match="caller's own bug"):
                await use_and_fail()
            assert len(set(seen)) == 1, "one worker for the whole session"
            # The worker is back: ordinary calls (size 1, so on that worker) still run.
            assert await pool.run({"mode": "pid"}) == seen[0]


async def test_a_session_waits_for_a_free_worker_ahead_of_the_queue() -> None:
    order: list[str] = []
    with trio.fail_after(20):
        async with (
            open_pool(CRASH, size=1) as pool,
            trio.open_nursery() as nursery,
            pool.session() as first,
        ):

            async def second_session() -> None:
                async with pool.session() as second:
                    order.append("session")
                    assert second.pid == first.pid

            async def plain() -> None:
                await pool.run({"mode": "ok"})
                order.append("plain")

            nursery.start_soon(second_session)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(plain)
            await trio.testing.wait_all_tasks_blocked()
            assert order == []
            await first.run({"mode": "ok"})
    assert order == ["session", "plain"]


async def test_a_session_whose_worker_dies_reports_it() -> None:
    fast = qoper8d.SupervisorConfig(backoff_initial=0.0)
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1, supervisor=fast) as pool:
            async with pool.session() as worker:
                with pytest.raises(qoper8d.WorkerLost) as info:
                    await worker.run({"mode": "sigkill"})
                assert info.value.signal == signal.Signals.SIGKILL.name
                with pytest.raises(qoper8d.WorkerLost, match="is gone"):
                    await worker.run({"mode": "ok"})
            assert await pool.run({"mode": "pid"}) != worker.pid
