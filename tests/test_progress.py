"""Progress from a handler (SPEC 9), end to end: `qoper8d.progress()` in a real worker, the
master, `pool.run(on_progress=)` and the control socket's `"progress": true` lines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

import qoper8d
from qoper8d import Client, open_client, open_pool
from qoper8d.cli import CTL_OK, CTL_USAGE, ctl_main
from qoper8d.wire import REPORT_INTERVAL
from tests.harness import Connection, running_daemon

PROGRESS = "handlers.progress:handle"


def test_progress_outside_a_worker_raises() -> None:
    with pytest.raises(RuntimeError, match="not a qoper8d worker"):
        qoper8d.progress(1)


async def test_importing_progress_in_a_worker_imports_no_trio(start_method: str) -> None:
    with trio.fail_after(20):
        async with open_pool(PROGRESS, size=1, start_method=start_method) as pool:
            assert await pool.run({"mode": "modules"}, on_progress=lambda v: None) == []


@pytest.mark.parametrize("handler", [PROGRESS, "handlers.progress:handle_async"])
async def test_pool_run_hears_the_reports_in_order_and_the_last_before_the_result(
    handler: str,
) -> None:
    seen: list[Any] = []

    async def on_progress(value: Any) -> None:
        seen.append(value)
        await trio.lowlevel.checkpoint()

    with trio.fail_after(20):
        async with open_pool(handler, size=1) as pool:
            assert await pool.run({"mode": "count", "n": 1000}, on_progress=on_progress) == 1000
            # Values that cannot be sent raise in the handler, which carries on.
            assert await pool.run({"mode": "bad"}) == ["TypeError", "ValueError"]
            # Without on_progress the reports are dropped in the master, unseen.
            assert await pool.run({"mode": "count", "n": 10}) == 10
    assert seen
    assert seen == sorted(set(seen)), "coalesced, latest wins: never out of order"
    assert seen[-1] == 999


async def test_a_raising_progress_callback_cancels_the_action(tmp_path: Path) -> None:
    def on_progress(value: Any) -> None:
        raise LookupError(value)

    with trio.fail_after(20):
        async with open_pool(PROGRESS, size=1) as pool:
            steps = {"mode": "steps", "path": str(tmp_path / "never")}
            with pytest.raises(LookupError, match="started"):
                await pool.run(steps, on_progress=on_progress)
            # The worker running it was replaced; the pool carries on.
            assert await pool.run({"mode": "count", "n": 1}) == 1
            assert pool.statistics().outcomes["cancelled"] == 1


def _read_until_answer(conn: Connection, id_: int) -> tuple[list[Any], dict[str, Any]]:
    """The progress values for `id_`, then its answer (nothing else may come meanwhile)."""
    values: list[Any] = []
    while True:
        line = conn.receive()
        assert line is not None
        assert line["id"] == id_, line
        if "progress" not in line:
            return values, line
        values.append(line["progress"])


def test_socket_progress_lines_only_for_submits_that_ask(short_tmp: Path) -> None:
    """A tight loop of a million reports writes at most one frame per `REPORT_INTERVAL`
    (each becomes a line here, the client reading all along); the last value always comes
    before the answer; a submit without the flag never sees a progress line."""
    with (
        running_daemon(short_tmp, pool={"size": 1, "handler": PROGRESS}) as d,
        Connection(d.socket, timeout=60) as c,
    ):
        flood = {"mode": "flood", "n": 1_000_000}
        c.send({"id": 1, "op": "submit", "action": flood, "progress": True})
        values, answer = _read_until_answer(c, 1)
        seconds = answer["result"]
        assert values[-1] == 999_999
        assert values == sorted(values)
        assert len(values) <= seconds / REPORT_INTERVAL + 2
        c.send({"id": 2, "op": "submit", "action": {"mode": "count", "n": 100}})
        assert _read_until_answer(c, 2) == ([], {"id": 2, "ok": True, "result": 100})
        c.send({"id": 3, "op": "submit", "action": {"mode": "count", "n": 3}, "progress": 1})
        assert c.receive()["error"]["code"] == "bad_request"  # type: ignore[index]


def test_a_client_not_reading_gets_one_coalesced_progress_line(short_tmp: Path) -> None:
    """While answers wait to be sent, an action's reports are held back as one line, the
    latest, counted in the connection's unsent bytes and sent just before its answer."""
    big = 4 << 20  # far more than the socket's buffers hold
    config: dict[str, Any] = {
        "pool": {"size": 1, "handler": PROGRESS},
        "server": {"max_unsent_bytes": 64 << 20},
    }
    flood = {"mode": "flood", "n": 300_000}
    with (
        running_daemon(short_tmp, **config) as d,
        Connection(d.socket, timeout=60) as c,
        Connection(d.socket) as watcher,
    ):
        c.send(
            {"id": 1, "op": "submit", "action": {"mode": "big", "bytes": big}},
            {"id": 2, "op": "submit", "action": flood, "progress": True},
        )
        deadline = time.monotonic() + 60
        while (status := watcher.request({"id": 0, "op": "status"})["result"])["outcomes"][
            "result"
        ] < 2:
            assert time.monotonic() < deadline, status
        assert status["daemon"]["unsent_bytes"] > big // 2
        first = c.receive()
        assert first is not None
        assert first["id"] == 1
        assert len(first["result"]) == big
        assert _read_until_answer(c, 2)[0] == [299_999]


def test_both_clients_and_qoper8ctl_hear_progress(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    count = {"mode": "count", "n": 1000}
    with running_daemon(short_tmp, pool={"size": 1, "handler": PROGRESS}) as d:
        seen: list[Any] = []
        with Client(d.socket) as client:
            assert client.submit(count, on_progress=seen.append) == 1000
            assert client.submit({"mode": "count", "n": 5}) == 5  # no flag, no lines
        assert seen
        assert seen == sorted(set(seen))
        assert seen[-1] == 999

        async def async_client() -> list[Any]:
            heard: list[Any] = []

            async def on_progress(value: Any) -> None:
                heard.append(value)
                await trio.lowlevel.checkpoint()

            with trio.fail_after(20):
                async with open_client(d.socket) as client:
                    assert await client.submit(count, on_progress=on_progress) == 1000
            return heard

        heard = trio.run(async_client)
        assert heard
        assert heard[-1] == 999

        ctl = ["--socket", str(d.socket), "submit"]
        assert ctl_main([*ctl, "--progress", '{"mode": "count", "n": 3}']) == CTL_OK
        out, err = capsys.readouterr()
        assert out == "3\n"
        assert err.splitlines()[-1] == "progress: 2"
        assert ctl_main([*ctl, "--progress"]) == CTL_USAGE
