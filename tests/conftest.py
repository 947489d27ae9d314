"""Shared fixtures: every test runs as a child subreaper and proves no process outlives it.

The test process marks itself PR_SET_CHILD_SUBREAPER, so anything a test starts — workers,
a daemon, grandchildren a handler forked — stays in our process tree even when its parent
dies. After each test, `no_orphans` (autouse) fails the test if any descendant is still
alive, then kills and reaps it so the next test starts clean.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

# The cluster tests' redis-server fixtures, one for the session and one per test.
from tests.redis_fixtures import redis_own, redis_session  # noqa: F401

PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # pragma: no cover
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


_set_subreaper()


def stat_fields(pid: int | str) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name, which may hold spaces and
    parentheses: `[0]` is the state, `[1]` the parent, `[11]` and `[12]` user and system
    CPU in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used so far."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(root: int | None = None) -> set[int]:
    """Live (non-zombie) descendants of `root` (default: this process)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat_fields(entry)
        except OSError:
            continue
        if fields[0] == b"Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait (on pidfds, not by polling) until `pids` have exited; return those still alive."""
    import select

    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
            reap()
        return set(fds.values())
    finally:
        for fd in fds:
            os.close(fd)
        reap()


@pytest.fixture(autouse=True)
def no_orphans() -> Iterator[None]:
    reap()
    before = descendants()
    yield
    reap()
    leftover = descendants() - before
    if leftover:
        leftover = wait_gone(leftover, 1.0)
    if leftover:
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(leftover, 5.0)
        pytest.fail(f"processes outlived the test: {sorted(leftover)}")


@pytest.fixture(params=["forkserver", "spawn"])
def start_method(request: pytest.FixtureRequest) -> str:
    """Run a process test with each way of starting workers."""
    return str(request.param)


async def wait_exited(pid: int) -> None:
    """Wait until `pid` has exited, without reaping it (a running pool may be its parent)."""
    import trio

    fd = os.pidfd_open(pid)
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def parent_of(pid: int) -> int:
    return int(stat_fields(pid)[1])


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory for Unix socket paths (they are limited to 107 bytes)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="q8-", dir="/tmp"))
    os.chmod(path, 0o700)
    return path


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}
