"""The pool end to end, with real worker processes: results, every outcome, the batch rule."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

import qoper8d
from qoper8d import SupervisorConfig, open_pool
from qoper8d._jobs import Waiter
from qoper8d.stats import RECENT_EXITS
from qoper8d.wire import DURATION_BOUNDS

CRASH = "handlers.crash:handle"
# Crash tests restart workers quickly and many times; nothing here is about backoff.
FAST_RESTARTS = SupervisorConfig(max_restarts=1000, backoff_initial=0.0)


async def test_run_returns_the_result() -> None:
    with trio.fail_after(20):
        async with open_pool("handlers.echo:plus_one", size=2) as pool:
            assert await pool.run({"x": 41}) == 42
            assert pool.statistics().outcomes["result"] == 1


async def test_map_returns_results_in_order() -> None:
    with trio.fail_after(30):
        async with open_pool("handlers.echo:plus_one", size=2) as pool:
            got = [r async for r in pool.map({"x": i} for i in range(20_000))]
            assert got == list(range(1, 20_001))
            stats = pool.statistics()
            assert stats.outcomes["result"] == 20_000
            assert stats.queued == stats.in_flight == 0
            # Both workers took part: the queue was shared out, not run by one.
            assert all(w.actions_done > 0 for w in stats.workers)


async def test_map_accepts_an_async_source_and_a_small_window() -> None:
    async def source() -> Any:
        for i in range(500):
            yield {"x": i}

    with trio.fail_after(20):
        async with open_pool("handlers.echo:plus_one", size=2) as pool:
            got = [r async for r in pool.map(source(), window=7)]
            assert got == list(range(1, 501))


async def test_a_raising_handler_keeps_its_worker() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool:
            pid = await pool.run({"mode": "pid"})
            with pytest.raises(qoper8d.HandlerError) as info:
                await pool.run({"mode": "raise", "message": "no such user"})
            assert info.value.code == "handler_error"
            assert info.value.type == "ValueError"
            assert info.value.message == "no such user"
            assert "ValueError: no such user" in info.value.traceback
            assert await pool.run({"mode": "pid"}) == pid
            assert pool.statistics().workers[0].restarts == 0


async def test_an_unencodable_result_is_bad_result_and_the_worker_survives() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool:
            pid = await pool.run({"mode": "pid"})
            with pytest.raises(qoper8d.BadResult, match="not JSON-compatible"):
                await pool.run({"mode": "unencodable"})
            assert await pool.run({"mode": "pid"}) == pid


@pytest.mark.parametrize(
    ("action", "details"),
    [
        ({"mode": "exit", "code": 42}, {"exit_code": 42}),
        ({"mode": "sys_exit", "code": 3}, {"exit_code": 3}),
        ({"mode": "sigkill"}, {"signal": "SIGKILL"}),
        ({"mode": "sigsegv"}, {"signal": "SIGSEGV"}),
    ],
)
async def test_a_dying_worker_gives_worker_lost_with_its_exit(
    action: dict[str, Any], details: dict[str, Any], start_method: str
) -> None:
    with trio.fail_after(20), capture_logs() as logs:
        async with open_pool(
            CRASH, size=1, supervisor=FAST_RESTARTS, start_method=start_method
        ) as pool:
            pid = await pool.run({"mode": "pid"})
            with pytest.raises(qoper8d.WorkerLost) as info:
                await pool.run(action)
            err = info.value
            assert err.code == "worker_lost"
            assert err.pid == pid
            assert {k: err.details.get(k) for k in details} == details
            # The slot is served again, by a new process.
            new_pid = await pool.run({"mode": "pid"})
            assert new_pid != pid
            stats = pool.statistics()
            assert stats.workers[0].pid == new_pid
            assert stats.workers[0].restarts == 1
            assert stats.outcomes["worker_lost"] == 1
            last = stats.recent_exits[-1]
            assert (last.slot, last.pid, last.reason) == (0, pid, "crash")
            assert last.exit == details.get("signal", details.get("exit_code"))
            assert abs(last.at - time.time()) < 60
    exits = [e for e in logs if e["event"] == "worker.exit" and e["pid"] == pid]
    assert len(exits) == 1
    assert exits[0]["reason"] == "crash"
    assert exits[0]["slot"] == 0
    assert f'"mode":"{action["mode"]}"' in exits[0]["doing"]


async def test_sigsegv_logs_the_python_stack() -> None:
    with trio.fail_after(20), capture_logs() as logs:
        async with open_pool(CRASH, size=1, supervisor=FAST_RESTARTS) as pool:
            with pytest.raises(qoper8d.WorkerLost):
                await pool.run({"mode": "sigsegv"})
    lines = [e["line"] for e in logs if e["event"] == "worker.output"]
    assert any("Segmentation fault" in line for line in lines)
    assert any("crash.py" in line for line in lines)


async def test_sigkill_of_a_busy_worker_from_outside(start_method: str) -> None:
    with trio.fail_after(20):
        async with open_pool(
            CRASH, size=1, supervisor=FAST_RESTARTS, start_method=start_method
        ) as pool:
            pid = await pool.run({"mode": "pid"})
            outcome: list[BaseException] = []

            async def run_hang() -> None:
                try:
                    await pool.run({"mode": "hang"})
                except qoper8d.WorkerLost as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_hang)
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().workers[0].state == "busy"
                os.kill(pid, signal.SIGKILL)
            (err,) = outcome
            assert isinstance(err, qoper8d.WorkerLost)
            assert err.signal == "SIGKILL"
            assert err.pid == pid
            assert await pool.run({"mode": "pid"}) != pid


async def test_max_attempts_reruns_an_action_whose_worker_died(tmp_path: Path) -> None:
    record = tmp_path / "runs"
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1, max_attempts=2, supervisor=FAST_RESTARTS) as pool:
            with pytest.raises(qoper8d.WorkerLost) as info:
                await pool.run({"mode": "sigkill", "id": "a", "record": str(record)})
            assert info.value.details["attempts"] == 2
    assert record.read_text().split() == ["a", "a"]


async def test_an_action_that_kills_every_worker_is_poisoned(tmp_path: Path) -> None:
    record = tmp_path / "runs"
    with trio.fail_after(30):
        async with open_pool(
            CRASH, size=2, max_attempts=10, poison_threshold=3, supervisor=FAST_RESTARTS
        ) as pool:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.run, {"mode": "ok"})
                with pytest.raises(qoper8d.Poisoned) as info:
                    await pool.run({"mode": "sigkill", "id": "p", "record": str(record)})
            assert info.value.code == "poisoned"
            # The rest of the load is unaffected.
            oks = [r async for r in pool.map({"mode": "ok", "n": i} for i in range(100))]
            assert len(oks) == 100
            assert pool.statistics().outcomes["poisoned"] == 1
    assert record.read_text().split() == ["p"] * 3


async def test_batch_rule_when_a_worker_dies_mid_batch(tmp_path: Path) -> None:
    """The first unanswered action may have run; the rest never started and run later."""
    record = tmp_path / "runs"
    actions = [{"mode": "ok", "id": i, "record": str(record)} for i in range(10)]
    actions[4] = {"mode": "sigkill", "id": 4, "record": str(record)}
    with trio.fail_after(20):
        # One worker and a queue of ten: one batch of all ten.
        async with open_pool(CRASH, size=1, supervisor=FAST_RESTARTS) as pool:
            got = [r async for r in pool.map(actions, return_exceptions=True)]
    assert [g["id"] for g in got if isinstance(g, dict)] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert isinstance(got[4], qoper8d.WorkerLost)
    runs = Counter(int(x) for x in record.read_text().split())
    assert runs == dict.fromkeys(range(10), 1), "nothing lost, nothing run twice"


async def test_answers_held_for_the_pacer_survive_the_worker_s_death(tmp_path: Path) -> None:
    """Answers of slow batched actions wait in the pipe for the pacer's tick; the worker
    dying right after writing them loses none: they are results, not `worker_lost`."""
    record = tmp_path / "runs"
    actions = [{"mode": "ok", "id": i, "sleep": 0.002, "record": str(record)} for i in range(40)]
    actions[30] = {"mode": "sigkill", "id": 30, "record": str(record)}
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1, supervisor=FAST_RESTARTS) as pool:
            got = [r async for r in pool.map(actions, return_exceptions=True)]
    assert [g["id"] for g in got if isinstance(g, dict)] == [i for i in range(40) if i != 30]
    assert isinstance(got[30], qoper8d.WorkerLost)
    runs = Counter(int(x) for x in record.read_text().split())
    assert runs == dict.fromkeys(range(40), 1), "nothing lost, nothing run twice"


async def test_queue_full_is_refused_at_once() -> None:
    with trio.fail_after(20):
        async with (
            open_pool(CRASH, size=1, max_queue=3) as pool,
            trio.open_nursery() as nursery,
        ):
            # One running, three queued: the queue is full.
            for _ in range(4):
                nursery.start_soon(pool.run, {"mode": "hang"})
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.in_flight, stats.queued) == (1, 3)
            with pytest.raises(qoper8d.QueueFull):
                await pool.run({"mode": "ok"})
            nursery.cancel_scope.cancel()


async def test_ended_and_cancelled_calls_leave_no_waiter_behind() -> None:
    # A job is not tracked by the garbage collector and refers to its waiter, which refers
    # back to the job while it waits: a wait that ended without breaking that cycle would
    # keep both alive for ever, in a daemon that runs for months. Every way out is taken
    # here: answered on the idle fast path and through the queue, cancelled while queued
    # and while running.
    def waiters() -> int:
        gc.collect()
        return sum(isinstance(o, Waiter) for o in gc.get_objects())

    with trio.fail_after(20):
        async with open_pool(CRASH, size=1, supervisor=FAST_RESTARTS) as pool:
            assert await pool.run({"mode": "ok"}) == {"mode": "ok"}
            before = waiters()
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(pool.run, {"mode": "ok"})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.run, {"mode": "hang"})
                await trio.testing.wait_all_tasks_blocked()
                for _ in range(20):
                    nursery.start_soon(pool.run, {"mode": "ok"})
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().queued == 20
                nursery.cancel_scope.cancel()
            assert pool.statistics().outcomes["cancelled"] == 21
            assert waiters() == before


async def test_a_shallow_queue_gives_each_worker_one_action() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=3) as pool, trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(pool.run, {"mode": "hang"})
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert [w.in_flight for w in stats.workers] == [1, 1, 1]
            assert all(w.running_for is not None for w in stats.workers)
            nursery.cancel_scope.cancel()


async def test_a_caller_polls_for_its_answer_only_while_answers_come_that_fast() -> None:
    # Polling pays when the answer is there within `pool.idle_spin`; for slower actions it
    # is CPU thrown away, which 256 callers of 10 ms actions spent on nothing else. A large
    # idle_spin (5 ms) keeps echo's answers well inside it on a loaded machine too.
    polls = Counter[int]()

    def counted(worker: Any) -> None:
        poll = worker.poll

        def counting(timeout: int) -> list[tuple[int, int]]:
            polls[worker.pid] += 1
            return poll(timeout)  # type: ignore[no-any-return]

        worker.poll = counting

    async def polls_of_one_call(action: dict[str, Any]) -> int:
        polls.clear()
        await pool.run(action)
        return sum(polls.values())

    with trio.fail_after(30):
        async with open_pool("handlers.sleep:handle", size=1, idle_spin=0.005) as pool:
            for worker in pool._engine.live:
                counted(worker)
            assert await polls_of_one_call({"seconds": 0}) > 0  # a fresh pool polls
            slow = [await polls_of_one_call({"seconds": 0.03}) for _ in range(12)]
            assert slow[0] > 0  # 5 ms of polling missed it, and the next few the same
            assert slow[-3:] == [0, 0, 0]  # learned: it waits in epoll at once
            fast = [await polls_of_one_call({"seconds": 0}) for _ in range(30)]
            assert fast[:3] == [0, 0, 0]
            assert all(fast[-3:])  # fast again: it polls again


async def test_statistics_record_every_field() -> None:
    with trio.fail_after(20):
        async with open_pool("handlers.echo:handle", size=2) as pool:
            await pool.run({"hello": "world"})
            stats = pool.statistics()
    assert stats.state == "running"
    assert (stats.size, stats.busy, stats.idle, stats.queued) == (2, 0, 2, 0)
    assert stats.submitted == 1
    assert stats.outcomes == {
        "result": 1,
        "handler_error": 0,
        "bad_result": 0,
        "worker_lost": 0,
        "timeout": 0,
        "cancelled": 0,
        "poisoned": 0,
        "shutting_down": 0,
    }
    assert stats.healthy
    for w in stats.workers:
        assert w.pid is not None
        assert w.state == "idle"
        assert w.rss_bytes is not None
        assert w.rss_bytes > 1_000_000
        assert w.uptime > 0
    assert sum(w.actions_done for w in stats.workers) == 1


async def test_setup_runs_before_ready_and_teardown_on_a_graceful_stop(
    tmp_path: Path, start_method: str
) -> None:
    marker = tmp_path / "teardown"
    os.environ["QOPER8_TEST_TEARDOWN"] = str(marker)
    try:
        with trio.fail_after(20):
            async with open_pool(
                "handlers.lifecycle:handle", size=2, start_method=start_method
            ) as pool:
                assert await pool.run({}) == {"setup_ran": True}
    finally:
        del os.environ["QOPER8_TEST_TEARDOWN"]
    assert sorted(marker.read_text().split()) == ["teardown", "teardown"]


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
async def test_async_handlers_run_on_the_chosen_event_loop(backend: str) -> None:
    with trio.fail_after(30):
        async with open_pool("handlers.sleep:handle_async", size=2, async_backend=backend) as pool:
            got = [r async for r in pool.map({"seconds": 0.001, "n": i} for i in range(20))]
            assert [g["n"] for g in got] == list(range(20))


async def test_routes_send_actions_by_type_to_other_handlers() -> None:
    with trio.fail_after(20):
        async with open_pool(
            "handlers.echo:handle", size=1, routes={"inc": "handlers.echo:plus_one"}
        ) as pool:
            assert await pool.run({"type": "inc", "x": 1}) == 2
            assert await pool.run({"type": "other", "x": 1}) == {"type": "other", "x": 1}


@pytest.mark.parametrize(
    ("handler", "match"),
    [
        ("handlers.nonexistent:handle", "no module named 'handlers.nonexistent'"),
        ("handlers.echo:nope", "has no attribute 'nope'"),
        ("handlers.broken_setup:handle", "setup failed on purpose"),
    ],
)
async def test_a_handler_that_cannot_start_fails_the_pool_at_once(handler: str, match: str) -> None:
    with trio.fail_after(20), pytest.raises(qoper8d.WorkerStartError, match=match):
        async with open_pool(handler, size=2):
            pytest.fail("the pool must not start")


async def test_an_action_that_is_not_json_is_refused() -> None:
    with trio.fail_after(20):
        async with open_pool("handlers.echo:handle", size=1) as pool:
            with pytest.raises(qoper8d.BadRequest):
                await pool.run({"a": object()})
            assert pool.statistics().submitted == 0


async def test_leaving_a_map_early_withdraws_its_queued_actions() -> None:
    with trio.fail_after(20):
        async with open_pool("handlers.echo:plus_one", size=2) as pool:
            results = pool.map(({"x": i} for i in range(100_000)), window=1000)
            async for r in results:
                if r == 10:
                    break
            await results.aclose()
            stats = pool.statistics()
            assert stats.queued == 0
            assert stats.submitted == stats.outcomes["result"] + stats.outcomes["cancelled"]


async def test_a_map_resumed_after_break_loses_nothing() -> None:
    with trio.fail_after(20):
        async with open_pool("handlers.echo:plus_one", size=2) as pool:
            results = pool.map(({"x": i} for i in range(50_000)), window=1000)
            got = []
            async for r in results:
                got.append(r)
                if r == 12_345:
                    break
            got.extend([r async for r in results])
            assert got == list(range(1, 50_001))


async def test_breaking_out_of_a_map_warns_about_nothing(recwarn: pytest.WarningsRecorder) -> None:
    with trio.fail_after(20):
        async with open_pool("handlers.echo:plus_one", size=2) as pool:
            async for r in pool.map({"x": i} for i in range(1000)):
                if r == 10:
                    break
            gc.collect()
            await trio.testing.wait_all_tasks_blocked()
    assert [str(w.message) for w in recwarn] == []


async def test_map_fills_its_window_while_waiting_for_a_result() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1) as pool, trio.open_nursery() as nursery:

            async def consume() -> None:
                actions = ({"mode": "hang", "n": i} for i in range(100_000))
                async for _ in pool.map(actions, window=40_000):
                    pass

            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            # The first result will never come; the window is full all the same.
            assert stats.queued + stats.in_flight == 40_000
            nursery.cancel_scope.cancel()


async def test_a_batch_of_large_results_is_cut_and_nothing_is_lost() -> None:
    """A worker stops a batch once its results pass about a MiB (`Cut`): the rest goes back
    to the queue and every result still arrives, in order."""
    with trio.fail_after(30):
        async with qoper8d.open_pool("handlers.crash:handle", size=1) as pool:
            actions = [{"mode": "big", "bytes": 300_000, "i": i} for i in range(40)]
            # Small results first, so the pool's estimate of a result's size is small and
            # the big actions go out in large batches the worker has to cut.
            assert [r async for r in pool.map([{"i": i} for i in range(2000)])][-1] == {"i": 1999}
            results = [r async for r in pool.map(actions)]
    assert [len(r) for r in results] == [300_000] * 40


async def test_tasks_sharing_a_session_take_turns_in_call_order() -> None:
    """Four tasks `run` on one session at once: each gets its own result, on the session's
    one worker, one at a time in the order they called (it was once killed by SIGTERM)."""
    order: list[int] = []
    with trio.fail_after(20):
        async with qoper8d.open_pool("handlers.crash:handle", size=2) as pool:
            async with pool.session() as worker, trio.open_nursery() as nursery:

                async def run(i: int) -> None:
                    result = await worker.run({"mode": "pid", "sleep": 0.05, "i": i})
                    assert result == worker.pid
                    order.append(i)

                for i in range(4):
                    nursery.start_soon(run, i)
                    await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
    assert sorted(order) == [0, 1, 2, 3]
    assert order == [0, 1, 2, 3], "in call order"
    assert stats.outcomes["result"] == 4
    assert stats.restarts == 0


def _at_or_past(seconds: float) -> int:
    """The first bucket an action that ran at least `seconds` can land in."""
    return next(k for k, bound in enumerate(DURATION_BOUNDS) if bound >= seconds)


async def test_durations_count_each_action_in_its_bucket_as_its_worker_timed_it() -> None:
    """Counted per action where it ran, merged per batch: a map's quick actions and three
    known sleeps add up to what ran, each sleep at or past its own bucket (a slow machine
    can only make them longer); batch means would put the sleeps' time on their
    neighbours."""
    sleeps = [0.005, 0.02, 0.1]
    with trio.fail_after(30):
        async with open_pool(CRASH, size=1) as pool:
            assert pool.statistics().durations.counts == (0,) * (len(DURATION_BOUNDS) + 1)
            actions = [{"mode": "ok", "n": i} for i in range(500)]
            actions[100:100] = [{"mode": "ok", "sleep": s} for s in sleeps]
            assert len([r async for r in pool.map(actions)]) == 503
            for s in sleeps:
                await pool.run({"mode": "ok", "sleep": s})
            durations = pool.statistics().durations
    counts = durations.counts
    assert sum(counts) == 503 + 3, "every action counted once, none left behind"
    for i, s in enumerate(sorted(sleeps, reverse=True)):
        assert sum(counts[_at_or_past(s) :]) >= 2 * (i + 1), (s, counts)
    assert durations.total >= 2 * sum(sleeps)


async def test_recent_exits_keep_the_last_few_oldest_first() -> None:
    with trio.fail_after(60):
        async with open_pool(CRASH, size=1, supervisor=FAST_RESTARTS) as pool:
            pids = []
            for _ in range(RECENT_EXITS + 1):
                pids.append(await pool.run({"mode": "pid"}))
                with pytest.raises(qoper8d.WorkerLost):
                    await pool.run({"mode": "sigkill"})
            exits = pool.statistics().recent_exits
    assert [e.pid for e in exits] == pids[1:]
    assert {(e.exit, e.reason) for e in exits} == {("SIGKILL", "crash")}


@pytest.mark.parametrize(
    "forged",
    [
        '[30,"soon",[]]\n',  # undecodable
        "[30,5,[0]]\n",  # counts not in pairs
        "[30,5,[99,1]]\n",  # no such bucket
        "[30,-5,[0,1]]\n",  # negative time
        "[30,1" + "0" * 400 + ",[0,1]]\n",  # a time no float holds
        "[30,5,[0,1" + "0" * 400 + "]]\n",  # a count no float holds
        '[15,"info","x",{}]\n[30,5,[0,0]]\n',  # among other frames, counting nothing
        '[19,"' + "x" * 5000 + '"]\n',  # a progress value past MAX_PROGRESS_BYTES
    ],
    ids=[
        "undecodable",
        "odd",
        "bucket",
        "negative",
        "huge",
        "huge_count",
        "mixed",
        "long_progress",
    ],
)
async def test_a_forged_timed_or_progress_frame_is_a_protocol_error(forged: str) -> None:
    """A handler writing such frames on its channel costs its worker (replaced) and the
    action it ran; the counts stay as they were and the pool carries on."""
    with trio.fail_after(20), capture_logs() as logs:
        async with open_pool(CRASH, size=1, supervisor=FAST_RESTARTS) as pool:
            pid = await pool.run({"mode": "pid"})
            before = pool.statistics().durations
            with pytest.raises(qoper8d.WorkerLost):
                await pool.run({"mode": "channel", "data": forged})
            assert await pool.run({"mode": "pid"}) != pid
            stats = pool.statistics()
    assert [e["pid"] for e in logs if e["event"] == "worker.protocol_error"] == [pid]
    assert stats.recent_exits[-1].reason == "protocol error"
    # The pid run after, and the forging action if its own Timed frame came first.
    assert sum(stats.durations.counts) - sum(before.counts) in (1, 2)
