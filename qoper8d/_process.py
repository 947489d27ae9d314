"""Worker processes as the master sees them: spawn, wait for exit, signal, clean up.

Each worker runs in a session of its own (so Ctrl-C in the master's terminal never reaches
it, and everything it forks shares its process group) and gets four descriptors: stdout and
stderr pipes the master reads, the channel (fd 3), and the lifeline (fd 4, see worker.py).

Exit is observed through a pidfd, which trio waits on like any other descriptor. The exit
status is read with WNOWAIT first, so the pid stays reserved while we kill whatever is left
in the worker's process group (grandchildren a handler forked); only then is it reaped. No
signal is ever sent to a pid after it was reaped, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec
import trio

from qoper8d import wire

__all__ = ["CHANNEL_FD", "LIFELINE_FD", "ExitStatus", "Launcher", "WorkerProcess", "spawn_worker"]

CHANNEL_FD = 3
LIFELINE_FD = 4


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a worker process ended: an exit code, or the signal that killed it."""

    exit_code: int | None = None
    signal: int | None = None

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def details(self) -> dict[str, object]:
        """For error details and log events: `exit_code` or `signal` (by name)."""
        if self.signal is not None:
            return {"signal": self.signal_name}
        return {"exit_code": self.exit_code}

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by {self.signal_name}"
        if self.exit_code is None:
            return "exit status unknown"
        return f"exit code {self.exit_code}"


class WorkerProcess(Protocol):
    """What the pool needs from a worker process, whatever started it."""

    pid: int
    #: The master's end of the channel, non-blocking.
    channel: socket.socket
    #: Read ends of the worker's stdout and stderr, by stream name (the pool owns them).
    output: dict[str, int]

    async def wait(self) -> ExitStatus:
        """Return once the process has exited and been cleaned up."""
        ...

    def signal(self, signum: int) -> None:
        """Signal the worker and its process group; a no-op once it has been reaped."""
        ...


class Launcher(Protocol):
    """Starts worker processes; the pool does the ready handshake itself."""

    async def launch(self, spec: wire.WorkerSpec) -> WorkerProcess: ...


class _SpawnedWorker:
    __slots__ = ("_lifeline", "_pidfd", "_status", "channel", "output", "pid")

    def __init__(
        self, pid: int, channel: socket.socket, lifeline: int, output: dict[str, int]
    ) -> None:
        self.pid = pid
        self.channel = channel
        self.output = output
        self._lifeline = lifeline
        self._pidfd = os.pidfd_open(pid)
        self._status: ExitStatus | None = None

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        await trio.lowlevel.wait_readable(self._pidfd)
        info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOWAIT)
        if info is not None and info.si_code == os.CLD_EXITED:
            status = ExitStatus(exit_code=info.si_status)
        elif info is not None:
            status = ExitStatus(signal=info.si_status)
        else:  # pragma: no cover - the pidfd said it exited
            status = ExitStatus()
        # Still a zombie, so its pid (and process group id) cannot have been reused yet.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
        self._status = status
        os.close(self._pidfd)
        os.close(self._lifeline)
        return status

    def signal(self, signum: int) -> None:
        if self._status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)


def _high_dup(fd: int) -> int:
    # Park a descriptor above the ones the child gets (0-4), so the dup2 file actions below
    # can never overwrite a source before it is copied.
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


class SpawnLauncher:
    """Starts each worker as a fresh interpreter: `python -m qoper8d.worker`."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if env is None else env)

    async def launch(self, spec: wire.WorkerSpec) -> WorkerProcess:
        return await spawn_worker(spec, self._env)


async def spawn_worker(spec: wire.WorkerSpec, env: Mapping[str, str]) -> _SpawnedWorker:
    spec = msgspec.structs.replace(spec, channel_fd=CHANNEL_FD, lifeline_fd=LIFELINE_FD)
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    lifeline_r, lifeline_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    sources = [_high_dup(fd) for fd in (devnull, out_w, err_w, worker_end.fileno(), lifeline_r)]
    for fd in (devnull, out_w, err_w, lifeline_r):
        os.close(fd)
    worker_end.close()
    argv = [sys.executable, "-m", "qoper8d.worker", msgspec.json.encode(spec).decode()]
    actions = [(os.POSIX_SPAWN_DUP2, src, dst) for dst, src in enumerate(sources)]
    try:
        pid = await trio.to_thread.run_sync(
            lambda: os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
        )
    except BaseException:
        master_end.close()
        for fd in (out_r, err_r, lifeline_w):
            os.close(fd)
        raise
    finally:
        for fd in sources:
            os.close(fd)
    master_end.setblocking(False)
    return _SpawnedWorker(pid, master_end, lifeline_w, {"stdout": out_r, "stderr": err_r})
