"""Worker processes as the master sees them: spawn, wait for exit, signal, clean up.

Each worker runs in a session of its own (so Ctrl-C in the master's terminal never reaches
it, and everything it forks shares its process group) and gets these descriptors: stdout and
stderr pipes the master reads, the channel (a pipe to read batches from, fd 3, and one to
write answers to, fd 4) and the lifeline (fd 5, see worker.py).

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
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec
import trio

from qoper8d import wire

__all__ = ["ExitStatus", "Launcher", "SpawnLauncher", "WorkerProcess", "spawn_worker"]

FROM_MASTER_FD = 3
TO_MASTER_FD = 4
LIFELINE_FD = 5


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
    #: Non-blocking write end of the pipe the worker reads batches from (the pool owns it).
    to_worker: int
    #: Non-blocking read end of the pipe the worker writes answers to (the pool owns it).
    from_worker: int
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
    __slots__ = ("_lifeline", "_pidfd", "_status", "from_worker", "output", "pid", "to_worker")

    def __init__(
        self, pid: int, to_worker: int, from_worker: int, lifeline: int, output: dict[str, int]
    ) -> None:
        self.pid = pid
        self.to_worker = to_worker
        self.from_worker = from_worker
        self.output = output
        self._lifeline = lifeline
        self._pidfd = os.pidfd_open(pid)
        self._status: ExitStatus | None = None

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        await trio.lowlevel.wait_readable(self._pidfd)
        # The pidfd is readable: the process has exited, so neither waitid blocks.
        info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
        if info is not None and info.si_code == os.CLD_EXITED:
            status = ExitStatus(exit_code=info.si_status)
        elif info is not None:
            status = ExitStatus(signal=info.si_status)
        else:  # pragma: no cover - the pidfd said it exited
            status = ExitStatus()
        # Still a zombie, so its pid (and process group id) cannot have been reused yet.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)  # noqa: ASYNC222
        self._status = status
        os.close(self._pidfd)
        os.close(self._lifeline)
        return status

    def signal(self, signum: int) -> None:
        if self._status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)


def _high_dup(fd: int) -> int:
    # Park a descriptor above the ones the child gets (0-5), so the dup2 file actions below
    # can never overwrite a source before it is copied.
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


class SpawnLauncher:
    """Starts each worker as a fresh interpreter: `python -m qoper8d.worker`."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if env is None else env)

    async def launch(self, spec: wire.WorkerSpec) -> WorkerProcess:
        return await spawn_worker(spec, self._env)


async def spawn_worker(spec: wire.WorkerSpec, env: Mapping[str, str]) -> _SpawnedWorker:
    spec = msgspec.structs.replace(
        spec, from_master_fd=FROM_MASTER_FD, to_master_fd=TO_MASTER_FD, lifeline_fd=LIFELINE_FD
    )
    batches_r, batches_w = os.pipe()
    answers_r, answers_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    # The child's descriptors 0-5, in order.
    child_ends = (devnull, out_w, err_w, batches_r, answers_w, lifeline_r)
    sources = [_high_dup(fd) for fd in child_ends]
    for fd in child_ends:
        os.close(fd)
    argv = [sys.executable, "-m", "qoper8d.worker", msgspec.json.encode(spec).decode()]
    actions = [(os.POSIX_SPAWN_DUP2, src, dst) for dst, src in enumerate(sources)]
    try:
        pid = await trio.to_thread.run_sync(
            lambda: os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
        )
    except BaseException:
        for fd in (batches_w, answers_r, out_r, err_r, lifeline_w):
            os.close(fd)
        raise
    finally:
        for fd in sources:
            os.close(fd)
    os.set_blocking(batches_w, False)
    os.set_blocking(answers_r, False)
    return _SpawnedWorker(pid, batches_w, answers_r, lifeline_w, {"stdout": out_r, "stderr": err_r})
