"""`Client` and `open_client` against a real daemon: results, every error outcome, pipelining,
early exits, the admin ops, the connect errors, and the async client under trio and asyncio."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import tomli_w
import trio

import qoper8d
from qoper8d import (
    ActionCancelled,
    ActionTimeout,
    ConnectError,
    ConnectTimeout,
    HandlerError,
    NotRunning,
    QueueFull,
    WorkerLost,
)
from qoper8d.client import AsyncClient, Client, open_client, resolve_socket_path
from tests.conftest import descendants, wait_gone
from tests.harness import Connection, running_daemon

ECHO = {"pool": {"handler": "handlers.echo:plus_one", "size": 2}}


def ok(i: int) -> dict[str, Any]:
    return {"mode": "ok", "i": i}


def test_the_package_exports_the_clients() -> None:
    assert qoper8d.Client is Client
    assert qoper8d.open_client is open_client


def test_submit_and_a_pipelined_map_in_order(short_tmp: Path) -> None:
    with running_daemon(short_tmp, **ECHO) as d, Client(d.socket, timeout=10) as client:
        assert client.hello()["protocol"] == 1
        assert client.submit({"x": 41}) == 42
        results = list(client.map({"x": i} for i in range(20_000)))
        assert results == [i + 1 for i in range(20_000)]
        # A small window still gets every result, in order; other requests may be made while
        # a map is under way on the same connection.
        interleaved = []
        for result in client.map(({"x": i} for i in range(50)), window=3):
            interleaved.append(result)
            if result == 25:
                assert client.submit({"x": -1}) == 0
                assert client.status()["state"] == "running"
        assert interleaved == list(range(1, 51))
        assert client.status()["outcomes"]["result"] == 20_052


def test_big_actions_both_ways_at_once(short_tmp: Path) -> None:
    # Tens of MB in flight in each direction: more than the socket buffers and the daemon's
    # output limit hold, so a client that only wrote, or only read, at a time would deadlock.
    pad = "x" * 500_000
    echo = {"pool": {"handler": "handlers.echo:handle", "size": 2}}
    with running_daemon(short_tmp, **echo) as d, Client(d.socket, timeout=10) as client:
        actions = ({"i": i, "pad": pad} for i in range(100))
        for i, result in enumerate(client.map(actions, window=100)):
            assert result["i"] == i
            assert result["pad"] == pad


def test_map_with_a_failing_action(short_tmp: Path) -> None:
    actions = [ok(i) for i in range(200)]
    actions[137] = {"mode": "raise", "message": "one bad apple"}
    with running_daemon(short_tmp) as d, Client(d.socket, timeout=10) as client:
        results = list(client.map(actions, return_exceptions=True))
        assert [r for i, r in enumerate(results) if i != 137] == actions[:137] + actions[138:]
        error = results[137]
        assert isinstance(error, HandlerError)
        assert (error.type, error.message) == ("ValueError", "one bad apple")

        # Without return_exceptions the error is raised at its position...
        seen: list[Any] = []
        with pytest.raises(HandlerError, match="one bad apple"):
            seen.extend(client.map(actions))
        assert seen == actions[:137]
        # ...and the connection carries on, the abandoned submits cancelled or answered.
        assert client.submit(ok(-1)) == ok(-1)


class WaitLog:
    """A map's results as they come, and how many had come each time it was about to wait."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.waits: list[int] = []

    def add(self, result: Any) -> None:
        self.results.append(result)

    def on_wait(self) -> None:
        self.waits.append(len(self.results))


def test_on_wait_runs_whenever_the_next_result_is_not_in(short_tmp: Path) -> None:
    # With a window of 1 the next result is never in before its submit has gone out, so the
    # hook runs once per action, after the results before it were yielded.
    with running_daemon(short_tmp, **ECHO) as d, Client(d.socket, timeout=10) as client:
        log = WaitLog()
        for result in client.map(({"x": i} for i in range(20)), window=1, on_wait=log.on_wait):
            log.add(result)
        assert log.results == list(range(1, 21))
        assert log.waits == list(range(20))


def test_each_outcome_raises_its_error_class(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d, Client(d.socket, timeout=10) as client:
        with pytest.raises(HandlerError) as raised:
            client.submit({"mode": "raise", "message": "boom"})
        assert raised.value.type == "ValueError"
        assert "boom" in raised.value.traceback

        with pytest.raises(WorkerLost) as lost:
            client.submit({"mode": "sigkill"})
        assert lost.value.signal == "SIGKILL"
        assert lost.value.pid is not None

        with pytest.raises(ActionTimeout):
            client.submit({"mode": "hang"}, timeout=0.3)

        # max_attempts reaches the daemon: with two attempts the action dies twice.
        with pytest.raises(WorkerLost) as twice:
            client.submit({"mode": "sigkill"}, max_attempts=2)
        assert twice.value.details.get("attempts") == 2

        assert client.submit(ok(1)) == ok(1)


def test_queue_full(short_tmp: Path) -> None:
    with (
        running_daemon(short_tmp, pool={"size": 1, "max_queue": 1}) as d,
        Connection(d.socket) as raw,
        Client(d.socket, timeout=10) as client,
    ):
        raw.send({"id": "hang", "op": "submit", "action": {"mode": "hang"}})
        d.wait_event("worker.output", lambda e: e["line"] == "started hang")
        # Requests on one connection are handled in order: once the status is back, the
        # submit before it is in the queue.
        raw.send(
            {"id": "queued", "op": "submit", "action": ok(0)}, {"id": "status", "op": "status"}
        )
        assert raw.receive_all(1)[0]["result"]["queued"] == 1
        with pytest.raises(QueueFull) as refused:
            client.submit(ok(1))
        assert refused.value.details["max_queue"] == 1
        raw.send({"id": "c", "op": "cancel", "target": "hang"})
        responses = {r["id"]: r for r in raw.receive_all(3)}
        assert responses["hang"]["error"]["code"] == "cancelled"
        assert responses["queued"]["result"] == ok(0)


def test_leaving_a_map_early_cancels_what_is_outstanding(short_tmp: Path) -> None:
    # One worker: if the abandoned hang were not cancelled, nothing else could ever run.
    with running_daemon(short_tmp, pool={"size": 1}) as d, Client(d.socket, timeout=10) as c:
        actions = [ok(0), {"mode": "hang"}, *(ok(i) for i in range(1, 50))]
        for result in c.map(actions):
            assert result == ok(0)
            break
        assert c.submit(ok(99)) == ok(99)
        outcomes = c.status()["outcomes"]
        assert outcomes["cancelled"] >= 1
        assert outcomes["result"] + outcomes["cancelled"] == 52


def test_status_scale_and_reload(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d, Client(d.socket, timeout=10) as client:
        status = client.status()
        assert status["state"] == "running"
        assert status["size"] == 2
        assert len(status["workers"]) == 2
        assert status["daemon"]["socket"] == str(d.socket)

        client.scale(1)
        client.scale(2)
        assert client.status()["size"] == 2
        assert client.reload() == []

        d.config["pool"]["size"] = 3
        d.config_path.write_text(tomli_w.dumps(d.config))
        assert client.reload() == ["pool.size: 2 -> 3"]
        status = client.status()
        assert status["size"] == 3
        assert len(status["workers"]) == 3


def test_the_socket_comes_from_the_argument_the_config_or_the_default(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = short_tmp / "q.toml"
    config.write_text('[server]\nsocket = "sub/x.sock"\n')
    assert resolve_socket_path(short_tmp / "a.sock", config) == short_tmp / "a.sock"
    assert resolve_socket_path(None, config) == short_tmp / "sub" / "x.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp))
    assert resolve_socket_path() == short_tmp / "qoper8" / "qoper8.sock"
    with running_daemon(short_tmp, **ECHO) as d, Client(config=d.config_path) as client:
        assert client.path == d.socket
        assert client.submit({"x": 1}) == 2


def test_no_daemon(short_tmp: Path) -> None:
    missing = short_tmp / "missing.sock"
    with pytest.raises(NotRunning, match="no daemon: no socket at"):
        Client(missing)

    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # bound, never listening, closed: what a dead daemon leaves
    with pytest.raises(NotRunning, match=r"nothing listening on .*stale\.sock \(stale socket\)"):
        Client(stale)


async def test_no_daemon_async(short_tmp: Path) -> None:
    with pytest.raises(NotRunning, match="no socket at"):
        async with open_client(short_tmp / "missing.sock"):
            pass  # pragma: no cover


def test_a_daemon_that_does_not_answer_times_out(short_tmp: Path) -> None:
    # Listening but never accepting: connect(2) succeeds (the backlog), no answer comes.
    path = short_tmp / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)
        with Client(path, timeout=0.2) as client:
            with pytest.raises(ConnectTimeout, match=r"timed out after 0\.2 s talking to"):
                client.status()
            with pytest.raises(ConnectTimeout):
                client.hello()


def test_the_daemon_going_away_mid_request(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d, Client(d.socket, timeout=10) as client:
        assert client.submit(ok(1)) == ok(1)
        workers = descendants(d.proc.pid)

        def kill_when_it_runs() -> None:
            d.wait_event("worker.output", lambda e: e["line"] == "started hang")
            d.proc.kill()

        killer = threading.Thread(target=kill_when_it_runs)
        killer.start()
        try:
            with pytest.raises(NotRunning, match="closed the connection before answering"):
                client.submit({"mode": "hang"})
        finally:
            killer.join(30)
        assert d.wait() == -9
        # Orphaned workers exit by themselves once their master is gone.
        assert wait_gone(workers, 5.0) == set()
        # The next request tries a new connection, and finds nobody.
        with pytest.raises(NotRunning):
            client.status()
    client.close()
    with pytest.raises(ConnectError, match="closed"):
        client.status()


# -- async -------------------------------------------------------------------------------------


async def _exercise(client: AsyncClient) -> None:
    """The async client's whole surface, run under each backend."""
    assert (await client.hello())["protocol"] == 1
    assert await client.submit(ok(1)) == ok(1)
    results = [r async for r in client.map(ok(i) for i in range(3000))]
    assert results == [ok(i) for i in range(3000)]

    async def actions() -> Any:
        for i in range(100):
            yield {"mode": "raise"} if i == 7 else ok(i)

    mixed = [r async for r in client.map(actions(), window=16, return_exceptions=True)]
    assert isinstance(mixed[7], HandlerError)
    assert mixed[:7] == [ok(i) for i in range(7)]
    with pytest.raises(WorkerLost):
        await client.submit({"mode": "sigkill"})
    with pytest.raises(ActionTimeout):
        await client.submit({"mode": "hang"}, timeout=0.3)

    # Many tasks share the one connection; each gets its own answers.
    found: dict[int, list[Any]] = {}

    async def worker(n: int) -> None:
        found[n] = [await client.submit(ok(n * 100 + i)) for i in range(20)]

    async with anyio.create_task_group() as tasks:
        for n in range(40):
            tasks.start_soon(worker, n)
    assert found == {n: [ok(n * 100 + i) for i in range(20)] for n in range(40)}
    assert (await client.status())["state"] == "running"


async def test_open_client_under_trio(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d, trio.fail_after(30):
        async with open_client(d.socket, timeout=10) as client:
            await _exercise(client)


def test_open_client_under_asyncio(short_tmp: Path) -> None:
    async def main(path: Path) -> None:
        with anyio.fail_after(30):
            async with open_client(path, timeout=10) as client:
                await _exercise(client)

    with running_daemon(short_tmp) as d:
        anyio.run(main, d.socket, backend="asyncio")


async def test_on_wait_in_the_async_client(short_tmp: Path) -> None:
    async def actions() -> Any:
        for i in range(20):
            yield {"x": i}

    with running_daemon(short_tmp, **ECHO) as d, trio.fail_after(30):
        async with open_client(d.socket, timeout=10) as client:
            for source in (({"x": i} for i in range(20)), actions()):
                log = WaitLog()
                async for result in client.map(source, window=1, on_wait=log.on_wait):
                    log.add(result)
                assert log.results == list(range(1, 21))
                assert log.waits == list(range(20))


async def test_cancelling_a_submit_cancels_the_action(short_tmp: Path) -> None:
    with running_daemon(short_tmp, pool={"size": 1}) as d, trio.fail_after(30):
        async with open_client(d.socket, timeout=10) as client:
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def hang() -> None:
                    with scope:
                        await client.submit({"mode": "hang"})

                nursery.start_soon(hang)
                await trio.to_thread.run_sync(
                    d.wait_event, "worker.output", lambda e: e["line"] == "started hang"
                )
                scope.cancel()
            # The only worker was running the hang; it is free again only if it was cancelled.
            assert await client.submit(ok(2)) == ok(2)
            assert (await client.status())["outcomes"]["cancelled"] == 1


async def test_a_cancelled_block_cancels_its_actions(short_tmp: Path) -> None:
    with running_daemon(short_tmp, pool={"size": 1}) as d, trio.fail_after(30):
        with trio.CancelScope() as block:
            async with open_client(d.socket) as client, trio.open_nursery() as nursery:
                nursery.start_soon(client.submit, {"mode": "hang"})
                await trio.to_thread.run_sync(
                    d.wait_event, "worker.output", lambda e: e["line"] == "started hang"
                )
                block.cancel()
                await trio.sleep_forever()
        # Closing alone would leave the hang running (the daemon drops only queued work of
        # a client that disconnects); the one worker is free, so its cancel was sent.
        async with open_client(d.socket) as client:
            assert await client.submit(ok(1)) == ok(1)


async def test_leaving_an_async_map_early_and_the_body_error_unwrapped(short_tmp: Path) -> None:
    async def body(path: Path) -> None:
        async with open_client(path) as client:
            results = client.map([ok(0), {"mode": "hang"}, ok(1)])
            assert await anext(results) == ok(0)
            await results.aclose()
            # One worker, and it was running the abandoned hang: it must have been cancelled.
            assert await client.submit(ok(3)) == ok(3)
            raise KeyError("mine")

    # The block's own exception comes out as it went in, not in an ExceptionGroup.
    with (
        running_daemon(short_tmp, pool={"size": 1}) as d,
        trio.fail_after(30),
        pytest.raises(KeyError, match="mine"),
    ):
        await body(d.socket)


async def test_the_async_client_reconnects_after_the_daemon_restarts(short_tmp: Path) -> None:
    with trio.fail_after(30):
        with running_daemon(short_tmp, **ECHO) as d:
            async with open_client(d.socket, timeout=10) as client:
                assert await client.submit({"x": 1}) == 2
                d.stop()
                with pytest.raises(NotRunning):
                    await client.status()
                with running_daemon(short_tmp, **ECHO):
                    assert await client.submit({"x": 2}) == 3


def test_an_action_cancelled_by_another_connection_is_not_ours(short_tmp: Path) -> None:
    # Cancel targets ids on the same connection only: another client's ids are unknown.
    with running_daemon(short_tmp) as d, Client(d.socket) as client:
        assert client.cancel(12345) is False
        with Connection(d.socket) as raw:
            raw.send({"id": 1, "op": "submit", "action": {"mode": "hang"}})
            d.wait_event("worker.output", lambda e: e["line"] == "started hang")
            assert client.cancel(1) is False
            raw.send({"id": 2, "op": "cancel", "target": 1})
            responses = {r["id"]: r for r in raw.receive_all(2)}
        assert responses[1]["error"]["code"] == ActionCancelled.code
