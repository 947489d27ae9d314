"""File descriptors: the daemon keeps what its workers need, whatever its clients do.

The daemon runs under a lowered RLIMIT_NOFILE (set in the child before it starts, or
lowered from here while it runs, with prlimit(2)): established connections keep working,
a worker that cannot be replaced for lack of descriptors is retried, not fatal, and a limit
too low for the configuration stops the start as a configuration error.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import qoper8d
from qoper8d import _fds, open_pool
from qoper8d._fds import SPARE, fd_budget
from qoper8d.cli import EXIT_CONFIG
from tests.conftest import open_fds
from tests.harness import Connection, Daemon, base_config, running_daemon

CRASH = "handlers.crash:handle"


def nofile(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn: run the daemon with this RLIMIT_NOFILE."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def soft_limit(pid: int) -> int:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


def lowest_free_fd(pid: int) -> int:
    """The number the kernel would give the next descriptor `pid` opens."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


@contextmanager
def soft_limit_lowered(pid: int, soft: int) -> Iterator[None]:
    """Lower `pid`'s soft RLIMIT_NOFILE for the block (the hard limit stays: we restore)."""
    before, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (before, hard))


def status(c: Connection) -> dict[str, Any]:
    response = c.request({"id": "s", "op": "status"})
    assert response["ok"] is True, response
    result: dict[str, Any] = response["result"]
    return result


def test_the_budget_adds_up() -> None:
    assert fd_budget(2, 11) - fd_budget(2, 10) == 1  # a connection costs one
    per_worker = fd_budget(3, 10) - fd_budget(2, 10)
    assert per_worker == _fds.WORKER + _fds.STARTING
    # Nothing but workers and connections: what the pool alone needs.
    assert fd_budget(0, 0) == _fds.BASE + _fds.FORK_SERVER + per_worker


def test_a_running_daemon_holds_less_than_its_budget(short_tmp: Path) -> None:
    size, clients = 3, 20
    with running_daemon(short_tmp, pool={"size": size}) as d, ExitStack() as stack:
        connections = [stack.enter_context(Connection(d.socket)) for _ in range(clients)]
        for c in connections:
            assert c.request({"id": 1, "op": "hello"})["ok"]
        held = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        # What it holds, and the spare it keeps besides, is within what it asked for.
        assert held + SPARE <= fd_budget(size, clients), held
        assert status(connections[0])["daemon"]["open_fds"] == held


def test_a_hard_limit_too_low_is_a_configuration_error(short_tmp: Path) -> None:
    config = base_config(short_tmp, pool={"size": 2}, server={"max_connections": 256})
    needed = fd_budget(2, 256)
    for args in ((), ("--check-config",)):
        daemon = Daemon(short_tmp, config, ready=False, preexec_fn=nofile(160, 160), args=args)
        try:
            assert daemon.wait() == EXIT_CONFIG, "\n".join(daemon.lines)
            problems = [line for line in daemon.lines if "RLIMIT_NOFILE" in line]
            assert len(problems) == 1, daemon.lines
            for words in ("160", str(needed), "server.max_connections = 256", "pool.size = 2"):
                assert words in problems[0]
            assert not daemon.of("worker.ready")
        finally:
            daemon.close()


def test_the_soft_limit_is_raised_as_far_as_the_configuration_needs(short_tmp: Path) -> None:
    size, max_connections = 2, 200
    config = base_config(
        short_tmp, pool={"size": size}, server={"max_connections": max_connections}
    )
    daemon = Daemon(short_tmp, config, preexec_fn=nofile(160, 4096))
    try:
        assert soft_limit(daemon.proc.pid) == fd_budget(size, max_connections)
        with ExitStack() as stack:
            # Every connection the configuration allows, each answered.
            connections = [
                stack.enter_context(Connection(daemon.socket, timeout=10))
                for _ in range(max_connections)
            ]
            for c in connections:
                assert c.request({"id": 1, "op": "hello"})["ok"]
            with Connection(daemon.socket, timeout=10) as extra:
                refused = extra.receive()
                assert refused is not None
                assert refused["error"]["code"] == "too_many_connections"
            # A crash is replaced: there are descriptors for it.
            lost = connections[0].request({"id": 2, "op": "submit", "action": {"mode": "exit"}})
            assert lost["error"]["code"] == "worker_lost"
            daemon.wait_event("worker.ready", lambda e: len(daemon.of("worker.ready")) > size)
            for c in (connections[0], connections[-1]):
                assert status(c)["restarts"] == 1
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_a_tight_limit_still_starts(short_tmp: Path) -> None:
    # Below 100: the fork server used to park a worker's descriptors at 100 and up.
    config = base_config(short_tmp, pool={"size": 1}, server={"max_connections": 8})
    assert fd_budget(1, 8) <= 96
    daemon = Daemon(short_tmp, config, preexec_fn=nofile(96, 96))
    try:
        with Connection(daemon.socket) as c:
            assert c.request({"id": 1, "op": "submit", "action": {"mode": "ok"}})["ok"]
            c.request({"id": 2, "op": "submit", "action": {"mode": "exit"}})
            daemon.wait_event("worker.ready", lambda e: len(daemon.of("worker.ready")) > 1)
            assert c.request({"id": 3, "op": "submit", "action": {"mode": "ok"}})["ok"]
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_running_out_of_descriptors_drops_nothing_and_stops_nothing(short_tmp: Path) -> None:
    sections: dict[str, dict[str, Any]] = {
        "pool": {"size": 2},
        # Retries of a start that fails for lack of descriptors, often but not in a hot loop.
        "supervisor": {"max_restarts": 10_000, "backoff_initial": 0.05, "backoff_max": 0.1},
    }
    with running_daemon(short_tmp, **sections) as d, ExitStack() as stack:
        pid = d.proc.pid
        connections = [stack.enter_context(Connection(d.socket)) for _ in range(10)]
        for c in connections:
            assert c.request({"id": 1, "op": "hello"})["ok"]
        free = lowest_free_fd(pid)

        # Fewer than SPARE descriptors left: a new client is turned away, at once.
        with soft_limit_lowered(pid, free + SPARE - 3), Connection(d.socket) as late:
            refused = late.receive()
            assert refused is not None
            assert refused["error"]["code"] == "too_many_connections"
            assert late.receive() is None
        assert lowest_free_fd(pid) == free, "the refused connection is closed"

        # None left at all.
        with soft_limit_lowered(pid, free):
            # Established connections still answer status (its count needs no descriptor:
            # it counts what it can, those below the limit).
            for c in connections:
                counted = status(c)["daemon"]["open_fds"]
                assert free <= counted <= len(os.listdir(f"/proc/{pid}/fd"))
            # A client arriving now waits in the backlog; it is not lost.
            waiting = stack.enter_context(Connection(d.socket))
            waiting.send({"id": "w", "op": "hello"})
            d.wait_event("control.accept_failed")
            assert status(connections[-1])["daemon"]["connections"] == len(connections)
        hello = waiting.receive()
        assert hello is not None
        assert hello["id"] == "w"
        assert hello["ok"]

        with soft_limit_lowered(pid, lowest_free_fd(pid)):
            # A crash: its replacement cannot get its pipes, and is retried.
            c = connections[0]
            lost = c.request({"id": 2, "op": "submit", "action": {"mode": "exit", "code": 1}})
            assert lost["error"]["code"] == "worker_lost"
            d.wait_event("worker.start_failed", lambda e: "Too many open files" in e["error"])
            assert d.proc.poll() is None
            for c in connections:
                assert status(c)["state"] == "running"
        # Descriptors again: the slot gets its worker.
        d.wait_event("worker.ready", lambda e: len(d.of("worker.ready")) > 2)
        for c in connections:
            workers = status(c)["workers"]
            assert [w["state"] for w in workers] == ["idle", "idle"]


async def test_the_first_start_without_descriptors_is_a_start_error(start_method: str) -> None:
    before = open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    free = os.open(os.devnull, os.O_RDONLY)  # the lowest free number
    os.close(free)
    # Room for two pipes: the fork server's socket pair and a pipe, or a worker's two pipes.
    resource.setrlimit(resource.RLIMIT_NOFILE, (free + 4, hard))
    try:
        with trio.fail_after(20), pytest.raises(qoper8d.WorkerStartError, match="open files"):
            async with open_pool(CRASH, size=1, start_method=start_method):
                pass  # pragma: no cover - it cannot start
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert open_fds() <= before, "nothing leaked"


def test_a_daemon_out_of_descriptors_still_stops_cleanly(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d, Connection(d.socket) as c:
        assert c.request({"id": 1, "op": "hello"})["ok"]
        pid = d.proc.pid
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid), hard))
        # Telling systemd STOPPING=1 takes no new descriptor (the notify socket is opened at
        # start): it still goes, and the stop goes on.
        assert d.stop() == 0, "\n".join(d.lines[-10:])
        d._notify.settimeout(5)
        while b"STOPPING=1" not in d._notify.recv(4096).split(b"\n"):
            pass
