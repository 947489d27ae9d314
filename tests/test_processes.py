"""Process hygiene: no child outlives the pool or its master, no descriptor leaks, output
floods cannot stall the pool."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

import qoper8d
from qoper8d import SupervisorConfig, open_pool
from tests.conftest import descendants, open_fds, parent_of, wait_exited, wait_gone

CRASH = "handlers.crash:handle"


async def test_closing_the_pool_leaves_no_child_alive(start_method: str) -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=3, start_method=start_method) as pool:
            pids = {w.pid for w in pool.statistics().workers}
            assert None not in pids
            assert pids <= descendants()
    assert not (pids & descendants())


async def test_closing_with_busy_workers_stops_them_and_ends_their_actions() -> None:
    errors: list[BaseException] = []

    async def run(pool: qoper8d.Pool, action: dict[str, str]) -> None:
        try:
            await pool.run(action)
        except qoper8d.ShuttingDown as exc:
            errors.append(exc)

    with trio.fail_after(20):
        # The callers' nursery outlives the pool: it is closed while they wait.
        async with (
            trio.open_nursery() as nursery,
            open_pool(CRASH, size=2, grace_period=0.2, kill_timeout=0.2) as pool,
        ):
            nursery.start_soon(run, pool, {"mode": "hang"})
            nursery.start_soon(run, pool, {"mode": "ignore_term"})
            nursery.start_soon(run, pool, {"mode": "hang"})  # queued behind them
            await trio.testing.wait_all_tasks_blocked()
            pids = {w.pid for w in pool.statistics().workers}
            assert pool.statistics().queued == 1
    assert len(errors) == 3
    assert not (pids & descendants())


async def test_a_forked_grandchild_dies_with_its_worker(start_method: str) -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=1, start_method=start_method) as pool:
            grandchild = await pool.run({"mode": "fork"})
            assert grandchild in descendants()
    assert wait_gone({grandchild}, 2.0) == set()


async def test_no_descriptor_leaks_after_100_crashes(start_method: str) -> None:
    fast = SupervisorConfig(max_restarts=1000, backoff_initial=0.0)
    with trio.fail_after(90):
        async with open_pool(CRASH, size=2, supervisor=fast, start_method=start_method) as pool:
            await pool.run({"mode": "ok"})
            before = open_fds()
            lost = [
                r
                async for r in pool.map(
                    ({"mode": "exit", "code": 1} for _ in range(100)), return_exceptions=True
                )
            ]
            assert all(isinstance(r, qoper8d.WorkerLost) for r in lost)
            assert len(lost) == 100
            # The replacements are up and serving.
            assert len([r async for r in pool.map({"mode": "ok"} for _ in range(10))]) == 10
            stats = pool.statistics()
            assert stats.restarts == 100
            after = open_fds()
    assert len(after) <= len(before), f"leaked: {sorted(after - before)}"


async def test_a_stdout_flood_does_not_stall_the_pool(tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    with trio.fail_after(60), capture_logs() as logs:
        async with open_pool(CRASH, size=2) as pool, trio.open_nursery() as nursery:
            flooded: list[int] = []

            async def flood() -> None:
                flooded.append(await pool.run({"mode": "flood_until", "path": str(stop)}))

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            # While one worker floods, the other serves a steady stream of work.
            done = [r async for r in pool.map({"mode": "ok", "i": i} for i in range(2000))]
            assert len(done) == 2000
            stop.touch()
    assert flooded
    assert flooded[0] > 0
    output = [e for e in logs if e["event"] == "worker.output"]
    dropped = sum(e["lines"] for e in logs if e["event"] == "worker.output_dropped")
    assert output, "some of the flood is logged"
    assert len(output) + dropped == flooded[0]
    assert output[0]["stream"] == "stdout"
    assert output[0]["line"].startswith("flood line 0 ")


async def test_invalid_utf8_output_is_logged_escaped() -> None:
    with trio.fail_after(20), capture_logs() as logs:
        async with open_pool(CRASH, size=1) as pool:
            assert await pool.run({"mode": "flood_raw", "bytes": 4096}) == "flooded"
    lines = [e for e in logs if e["event"] == "worker.output"]
    assert {e["stream"] for e in lines} == {"stdout", "stderr"}
    assert all(isinstance(e["line"], str) for e in lines)
    assert any("\\xff\\xfe invalid" in e["line"] for e in lines)


_MASTER = textwrap.dedent(
    """
    import json, sys, trio, structlog
    import qoper8d

    structlog.configure(processors=[structlog.processors.JSONRenderer()])

    async def main():
        async with qoper8d.open_pool(
            "handlers.crash:handle", size=3, start_method=sys.argv[1]
        ) as pool:
            pids = [w.pid for w in pool.statistics().workers]
            print(json.dumps({"pids": pids}), flush=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.run, {"mode": "hang"})
                nursery.start_soon(pool.run, {"mode": "spin"})

    trio.run(main)
    """
)


def test_workers_exit_within_a_second_of_their_master_being_sigkilled(start_method: str) -> None:
    master = subprocess.Popen(
        [sys.executable, "-c", _MASTER, start_method],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert master.stdout is not None
        pids: set[int] = set()
        started: set[str] = set()
        # Synchronise on the master's own output: the pids, then both handlers running.
        for line in master.stdout:
            event = json.loads(line)
            if "pids" in event:
                pids = set(event["pids"])
            elif event.get("event") == "worker.output":
                started.add(event["line"])
            if pids and started == {"started hang", "started spin"}:
                break
        assert len(pids) == 3
        # Everything the master started: workers, and the fork server if there is one.
        started_by_master = descendants(master.pid)
        assert pids <= started_by_master
        master.send_signal(signal.SIGKILL)
        master.wait(timeout=5)
        left = wait_gone(started_by_master, 1.0)
        assert left == set(), "processes outlived their master by over 1 s"
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()
        if master.stdout is not None:
            master.stdout.close()


async def test_the_pool_survives_its_fork_server_being_killed() -> None:
    fast = SupervisorConfig(max_restarts=100, backoff_initial=0.0)
    with trio.fail_after(30), capture_logs() as logs:
        async with open_pool(CRASH, size=2, supervisor=fast) as pool:
            pid = await pool.run({"mode": "pid"})
            zygote = parent_of(pid)
            os.kill(zygote, signal.SIGKILL)
            await wait_exited(zygote)
            # Its workers serve on, orphaned ...
            assert len([r async for r in pool.map({"mode": "ok"} for _ in range(100))]) == 100
            # ... and a worker that dies now is replaced through a new fork server.
            before = {w.pid for w in pool.statistics().workers}
            with pytest.raises(qoper8d.WorkerLost):
                await pool.run({"mode": "sigkill"})
            assert await pool.run({"mode": "pid"}) > 0
            # Orphans of the dead fork server are the test's (its subreaper's) now; new
            # workers are children of a new, live fork server. A scale returns once its
            # worker serves, so at least that one is there to look at.
            await pool.scale(3)
            new = {w.pid for w in pool.statistics().workers if w.pid} - before
            assert new
            for worker in new:
                forkserver = parent_of(worker)
                assert forkserver not in (zygote, os.getpid())
                cmdline = await trio.Path(f"/proc/{forkserver}/cmdline").read_bytes()
                assert cmdline.startswith(b"qoper8d: fork server")
    assert any(e["event"] == "forkserver.exit" for e in logs)


async def test_hundreds_of_workers_start_at_once_through_one_fork_server() -> None:
    """256 launches outrun the fork server's socket (its queue of requests, each carrying
    descriptors, fills): they wait for room in turn, and every one starts. Before, the
    first refused send was taken for a dead fork server."""
    size = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8 * size)), hard))
    try:
        with trio.fail_after(90):
            async with open_pool("handlers.echo:plus_one", size=size) as pool:
                workers = pool.statistics().workers
                assert len({w.pid for w in workers if w.pid}) == size
                assert {w.state for w in workers} == {"idle"}
                zygotes = {parent_of(w.pid) for w in workers if w.pid}
                assert len(zygotes) == 1
                assert sum([r async for r in pool.map({"x": i} for i in range(size))]) == sum(
                    range(1, size + 1)
                )
                assert pool.statistics().restarts == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("preload", [True, False])
async def test_preload_imports_the_handler_in_the_fork_server(preload: bool) -> None:
    with trio.fail_after(20):
        async with open_pool("handlers.imported:handle", size=1, preload=preload) as pool:
            imported_in, worker = await pool.run({})
    assert (imported_in != worker) is preload
