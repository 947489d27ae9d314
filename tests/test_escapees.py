"""Escapees: what a handler forked that left its worker's process group (setsid) is stopped
with the fork server, which is their subreaper, when the pool or the daemon stops."""

from __future__ import annotations

import os
import select
from pathlib import Path

import trio

from qoper8d import open_pool
from tests.conftest import parent_of
from tests.harness import Connection, running_daemon

CRASH = "handlers.crash:handle"


def pidfds(pids: list[int]) -> list[int]:
    return [os.pidfd_open(pid) for pid in pids]


def exited(fds: list[int]) -> bool:
    """Have all these processes exited? Asked once, without waiting."""
    ready, _, _ = select.select(fds, [], [], 0)
    return len(ready) == len(fds)


def test_escapees_are_stopped_with_the_daemon(short_tmp: Path) -> None:
    with running_daemon(short_tmp, pool={"size": 1}) as d:
        with Connection(d.socket) as c:
            forked = c.request({"id": 1, "op": "submit", "action": {"mode": "fork_setsid"}})
            escapee, its_child = forked["result"]
            watched = pidfds([escapee, its_child])
            assert os.getsid(escapee) == escapee
            assert os.getpgid(its_child) == its_child
            zygote = d.wait_event("forkserver.ready")["pid"]
            # Its worker crashes: the escapee is reparented to the fork server, not to init.
            c.request({"id": 2, "op": "submit", "action": {"mode": "exit", "code": 1}})
            d.wait_event("worker.ready", lambda e: len(d.of("worker.ready")) >= 2)
            assert parent_of(escapee) == zygote
            assert not exited(watched)
        assert d.stop() == 0
    try:
        # The fork server killed and reaped them before it exited, and the daemon waited
        # for the fork server: nothing is left to wait for.
        assert exited(watched)
    finally:
        for fd in watched:
            os.close(fd)


async def test_escapees_are_stopped_with_the_pool() -> None:
    with trio.fail_after(20):
        async with open_pool(CRASH, size=2) as pool:
            pids = [pid for _ in range(2) for pid in await pool.run({"mode": "fork_setsid"})]
            watched = pidfds(pids)
            assert not exited(watched)
    try:
        assert exited(watched)
    finally:
        for fd in watched:
            os.close(fd)
