"""File descriptors: what the master needs for its workers and clients, and getting them.

Every worker costs the master six descriptors while it runs: the write end of the pipe it
reads batches from, the read ends of the pipes it writes answers, stdout and stderr to, the
write end of its lifeline, and a pidfd. While it starts, the master holds its five ends too
(until the fork server or posix_spawn has them) and posix_spawn parks six copies besides
/dev/null. The fork server costs five (its socket, lifeline, stdout, stderr, pidfd) and
about as many again while it starts. The rest is fixed: stdio, trio's epoll and wake-up
sockets, the signal wake-up socket, the log writer, the lock, the listener, inotify, the
systemd notify socket, and a few for a moment at a time (a /proc read, the status count, a
reload). Each client connection is one more.

`fd_budget()` adds these up for a pool size and a number of connections; the daemon raises
its soft RLIMIT_NOFILE that far at start (`ensure_fd_limit`), or refuses to start when the
hard limit is lower. The budget counts every worker as starting at once (the pool's start, a
scale-up, restarts after a mass crash) and one more beside them (a recycled worker's
replacement), so the descriptors the workers need are never the ones clients took. While it
runs, the control server keeps `SPARE` descriptors free whatever happens, by turning away
connections that would take them: enough for one worker and the fork server to start.
"""

from __future__ import annotations

import fcntl
import os
import resource

from qoper8d.errors import ConfigError

__all__ = [
    "BASE",
    "FORK_SERVER",
    "SPARE",
    "STARTING",
    "WORKER",
    "connection_room",
    "ensure_fd_limit",
    "fd_budget",
    "fd_limit_problem",
    "open_fd_count",
    "short_of_fds",
]

#: Held by a running worker: 5 pipe ends and a pidfd.
WORKER = 6
#: Held besides while a worker starts: its 5 ends, /dev/null and 6 copies posix_spawn parks.
STARTING = 12
#: The fork server: 5 held, and 9 more while it starts.
FORK_SERVER = 14
#: Everything else, with room for descriptors inherited from whoever started us.
BASE = 32
#: Kept free while serving, whatever else happens: one worker and the fork server can start.
SPARE = WORKER + STARTING + FORK_SERVER


def fd_budget(pool_size: int, max_connections: int) -> int:
    """Descriptors the master needs for `pool_size` workers and `max_connections` clients."""
    return BASE + FORK_SERVER + (WORKER + STARTING) * (pool_size + 1) + max_connections


def _limits() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def _describe(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def fd_limit_problem(pool_size: int, max_connections: int) -> str | None:
    """Why this process's hard RLIMIT_NOFILE cannot carry the budget, or None if it can."""
    needed = fd_budget(pool_size, max_connections)
    _, hard = _limits()
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return None
    return (
        f"RLIMIT_NOFILE: pool.size = {pool_size} and server.max_connections = "
        f"{max_connections} need {needed} file descriptors, but the hard limit is {hard}: "
        "raise it (ulimit -Hn; LimitNOFILE= under systemd) or lower server.max_connections "
        "or pool.size"
    )


def ensure_fd_limit(pool_size: int, max_connections: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE as far as the budget needs (never lower it); the soft
    limit before and after. Raises `ConfigError` if the hard limit is too low."""
    problem = fd_limit_problem(pool_size, max_connections)
    if problem is not None:
        raise ConfigError(problem, errors=[problem])
    needed = fd_budget(pool_size, max_connections)
    soft, hard = _limits()
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (OSError, ValueError) as exc:  # above fs.nr_open, say, though under the hard limit
        message = (
            f"RLIMIT_NOFILE: pool.size = {pool_size} and server.max_connections = "
            f"{max_connections} need {needed} file descriptors, but the soft limit "
            f"({_describe(soft)}) cannot be raised that far: {exc}"
        )
        raise ConfigError(message, errors=[message]) from None
    return soft, needed


def connection_room(pool_size: int) -> int:
    """Client connections the soft limit leaves room for, beside `pool_size` workers."""
    soft, _ = _limits()
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return soft - fd_budget(pool_size, 0)


def short_of_fds(fd: int) -> bool:
    """Would keeping `fd`, just accepted, leave fewer than `SPARE` descriptors free?

    The kernel hands out the lowest free number, so every descriptor below `fd` is in use:
    `fd` itself tells us, without a system call, that at most `soft - fd - 1` are left.
    """
    soft, _ = _limits()
    return soft != resource.RLIM_INFINITY and fd + 1 + SPARE > soft


def open_fd_count() -> int:
    """Descriptors this process has open; works even when none is left to list them with."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one the listing used
    except OSError:
        pass
    # No descriptor to spare for the listing (EMFILE): ask after each number instead. Only
    # numbers below the soft limit can be asked after; the limit lowered at run time may
    # leave a few above it, uncounted.
    soft, _ = _limits()
    count = 0
    for fd in range(soft if soft != resource.RLIM_INFINITY else 1 << 20):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        count += 1
    return count
