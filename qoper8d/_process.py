"""Worker processes as the master sees them: start, wait for exit, signal, clean up.

Each worker runs in a session of its own (Ctrl-C in the master's terminal never reaches it,
and everything it forks shares its process group) with these descriptors: 0 /dev/null,
1 and 2 pipes the master reads and logs, 3 the pipe it reads batches from, 4 the pipe it
writes answers to, 5 the lifeline (see worker.py).

Two launchers start workers:

* `ForkServerLauncher` (`pool.start_method = "forkserver"`, the default) keeps one warm
  interpreter, the fork server (zygote.py), and has it fork each worker: a replacement is
  serving within milliseconds instead of paying interpreter start-up and imports again.
* `SpawnLauncher` (`"spawn"`) starts a fresh `python -m qoper8d.worker` each time.

Both start children with `worker_environ()`, without what systemd meant for the master.
Exit is observed through a pidfd, which trio waits on like any descriptor, and the process
group is killed while the dead worker's pid is still reserved (as a zombie), so
grandchildren die with it and no signal ever reaches a recycled pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec
import structlog
import trio

from qoper8d import wire
from qoper8d._output import pump_output
from qoper8d._systemd import SYSTEMD_VARIABLES
from qoper8d._wakeup import Wakeup
from qoper8d.errors import WorkerStartError
from qoper8d.monitor import relay

__all__ = [
    "ExitStatus",
    "ForkServerLauncher",
    "Launcher",
    "SpawnLauncher",
    "WorkerProcess",
    "stop_worker",
    "worker_environ",
]

log = structlog.get_logger("qoper8d.pool")


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


def worker_environ(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What workers and the fork server start with: `env` (default ours) without systemd's
    variables for the main process (`NOTIFY_SOCKET`, `LISTEN_*`, `WATCHDOG_*`): a worker
    must never notify, feed the watchdog or take the control socket in the master's name."""
    source = os.environ if env is None else env
    return {name: value for name, value in source.items() if name not in SYSTEMD_VARIABLES}


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
        """Signal the worker; a no-op once it has exited."""
        ...


async def stop_worker(
    process: WorkerProcess,
    grace: float,
    gone: Callable[[], Awaitable[object]],
    *,
    asked: bool = False,
    now: bool = False,
    **about: object,
) -> None:
    """Stop a worker as trio stops a subprocess: ask, wait, insist, kill, and always wait.

    Unless it was `asked` already (a `Stop` frame written: it runs `teardown()` and exits),
    it gets SIGTERM; then `grace` seconds to go; then, if it was only asked, SIGTERM and
    `grace` more; then SIGKILL, logged as a warning (`worker.killed`, with `about`). `now`
    kills it at once. Whatever happens — this task cancelled included, which skips what is
    left of the grace — it returns only once `gone()` has: the process never outlives it.
    """
    try:
        if not now:
            if not asked:
                process.signal(signal.SIGTERM)
            for insist in ([signal.SIGTERM] if asked else []) + [signal.SIGKILL]:
                with trio.move_on_after(grace):
                    await gone()
                    return
                if insist == signal.SIGKILL:
                    log.warning("worker.killed", **{"pid": process.pid, **about}, after=grace)
                process.signal(insist)
        else:
            process.signal(signal.SIGKILL)
    except BaseException:
        process.signal(signal.SIGKILL)  # cancelled: no more grace
        with trio.CancelScope(shield=True):
            await gone()
        raise
    with trio.CancelScope(shield=True):
        await gone()


class Launcher(Protocol):
    """Starts worker processes; the pool does the ready handshake itself."""

    async def start(self, nursery: trio.Nursery) -> None:
        """Get ready to launch; background tasks go in `nursery`."""

    async def launch(self, spec: wire.WorkerSpec) -> WorkerProcess: ...

    async def aclose(self) -> None:
        """Called once every worker has exited."""


class _Fds:
    """The descriptors of one new worker: its ends (fds 1-5 in the child) and ours."""

    def __init__(self) -> None:
        out, err, batches, answers, lifeline = _pipes(5)
        #: The child's stdout, stderr, batches, answers and lifeline, in that order.
        self.child = [out[1], err[1], batches[0], answers[1], lifeline[0]]
        self.to_worker = batches[1]
        self.from_worker = answers[0]
        self.lifeline = lifeline[1]
        self.output = {"stdout": out[0], "stderr": err[0]}
        os.set_blocking(batches[1], False)
        os.set_blocking(answers[0], False)

    def close_child_ends(self) -> None:
        for fd in self.child:
            os.close(fd)
        self.child = []

    def close_all(self) -> None:
        self.close_child_ends()
        for fd in (self.to_worker, self.from_worker, self.lifeline, *self.output.values()):
            os.close(fd)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _pipes(count: int) -> list[tuple[int, int]]:
    """`count` pipes, or none: out of descriptors half-way, those made are closed again."""
    made: list[tuple[int, int]] = []
    try:
        for _ in range(count):
            made.append(os.pipe())  # noqa: PERF401 - one at a time: to close if one fails
    except BaseException:
        for pipe in made:
            for fd in pipe:
                os.close(fd)
        raise
    return made


def _posix_spawn(argv: list[str], child_fds: list[int], env: Mapping[str, str]) -> int:
    """Start `argv` in a new session with /dev/null as fd 0 and `child_fds` as fds 1, 2, ..."""
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    # Park every source above the child's range first, so that no dup2 action overwrites a
    # source before it is copied.
    sources: list[int] = []
    above = len(child_fds) + 1
    try:
        for fd in [devnull, *child_fds]:
            sources.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above))  # noqa: PERF401 - see _pipes
    except BaseException:
        for fd in sources:
            os.close(fd)
        raise
    finally:
        os.close(devnull)
    actions = [(os.POSIX_SPAWN_DUP2, src, dst) for dst, src in enumerate(sources)]
    try:
        return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    finally:
        for fd in sources:
            os.close(fd)


class _Watched:
    """A worker process watched through a pidfd: what both kinds have in common."""

    __slots__ = ("_lifeline", "_pidfd", "_status", "from_worker", "output", "pid", "to_worker")

    def __init__(self, pid: int, pidfd: int, fds: _Fds) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.to_worker = fds.to_worker
        self.from_worker = fds.from_worker
        self.output = fds.output
        self._lifeline = fds.lifeline
        self._status: ExitStatus | None = None

    async def wait(self) -> ExitStatus:
        if self._status is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            # The pidfd is readable: the process has exited.
            self._status = await self._exit_status()
            os.close(self._pidfd)
            os.close(self._lifeline)
        return self._status

    async def _exit_status(self) -> ExitStatus:
        raise NotImplementedError


class _ChildWorker(_Watched):
    """A worker that is our own child: we wait for it and reap it."""

    __slots__ = ()

    def __init__(self, pid: int, fds: _Fds) -> None:
        super().__init__(pid, os.pidfd_open(pid), fds)

    async def _exit_status(self) -> ExitStatus:
        # Neither waitid blocks: the process has exited.
        try:
            info = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
        except ChildProcessError:
            # Reaped behind our back (SIGCHLD ignored, or a waitpid(-1) elsewhere in the
            # program): the status is lost, and so is the safe moment to kill its group.
            return ExitStatus()
        # Still a zombie: its pid (and process group id) cannot have been reused yet.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)  # noqa: ASYNC222
        return _status_of(info)

    def signal(self, signum: int) -> None:
        if self._status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)


def _status_of(info: os.waitid_result | None) -> ExitStatus:
    if info is None:  # pragma: no cover - only asked once the process has exited
        return ExitStatus()
    if info.si_code == os.CLD_EXITED:
        return ExitStatus(exit_code=info.si_status)
    return ExitStatus(signal=info.si_status)


class SpawnLauncher:
    """Starts each worker as a fresh interpreter: `python -m qoper8d.worker`."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = worker_environ(env)

    async def start(self, nursery: trio.Nursery) -> None:
        pass

    async def launch(self, spec: wire.WorkerSpec) -> WorkerProcess:
        spec = msgspec.structs.replace(spec, from_master_fd=3, to_master_fd=4, lifeline_fd=5)
        argv = [sys.executable, "-m", "qoper8d.worker", msgspec.json.encode(spec).decode()]
        fds = _Fds()
        try:
            pid = await trio.to_thread.run_sync(_posix_spawn, argv, fds.child, self._env)
        except BaseException:
            fds.close_all()
            raise
        fds.close_child_ends()
        try:
            return _ChildWorker(pid, fds)
        except BaseException:  # no pidfd (EMFILE): it must not run on unwatched
            # Our child and not reaped yet, so its pid (and group) is still its own.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # noqa: ASYNC222 - killed: it is gone at once
            fds.close_all()
            raise

    async def aclose(self) -> None:
        pass


class _ForkedWorker(_Watched):
    """A worker forked by the fork server: its child, not ours. We hold a pidfd for it."""

    __slots__ = ("_zygote",)

    def __init__(self, zygote: _Zygote, pid: int, pidfd: int, fds: _Fds) -> None:
        super().__init__(pid, pidfd, fds)
        self._zygote = zygote

    async def _exit_status(self) -> ExitStatus:
        return await self._zygote.exit_status(self.pid)

    def signal(self, signum: int) -> None:
        # Only the worker itself, through its pidfd: its pid may be reaped and reused the
        # moment it exits. The fork server kills the rest of its process group on exit.
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)


class _Zygote:
    """The fork server process and our end of its control socket."""

    def __init__(self, pid: int, sock: socket.socket, lifeline: int) -> None:
        self.pid = pid
        self.sock = sock
        self.lifeline = lifeline
        self.pidfd = os.pidfd_open(pid)
        self.alive = True
        #: Set once it has exited and been reaped.
        self.gone = trio.Event()
        #: Launches waiting for their `Forked` reply, oldest first (replies come in order).
        self.pending: deque[_Reply] = deque()
        #: Exit statuses it reported, by pid, until the worker's own `wait()` takes them.
        self.exits: dict[int, ExitStatus] = {}
        self.exit_waiters: dict[int, trio.Event] = {}

    def exited(self, message: wire.Exited) -> None:
        self.exits[message.pid] = ExitStatus(exit_code=message.exit_code, signal=message.signal)
        event = self.exit_waiters.pop(message.pid, None)
        if event is not None:
            event.set()

    async def exit_status(self, pid: int) -> ExitStatus:
        """The status of a worker that has exited (its pidfd said so), once reported."""
        if pid not in self.exits and self.alive:
            event = self.exit_waiters.setdefault(pid, trio.Event())
            await event.wait()
        # If the fork server died first, the status died with it.
        return self.exits.pop(pid, ExitStatus())

    def reply(self, reply: tuple[int, int] | BaseException) -> None:
        waiting = self.pending.popleft()
        waiting.value = reply
        waiting.wakeup.wake()


class _Reply:
    """A launch waiting for the fork server's `Forked`: the pid and pidfd, or why not."""

    __slots__ = ("value", "wakeup")

    def __init__(self) -> None:
        self.wakeup = Wakeup()
        self.value: tuple[int, int] | BaseException = WorkerStartError("no reply")


class ForkServerLauncher:
    """Forks workers from a warm fork server (see zygote.py); restarts it if it dies."""

    def __init__(
        self,
        *,
        preload: list[str] | None = None,
        handler_path: list[str] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self._spec = wire.ZygoteSpec(
            control_fd=3,
            lifeline_fd=4,
            preload=list(preload or []),
            handler_path=list(handler_path or []),
        )
        self._env = worker_environ(env)
        self._start_timeout = start_timeout
        self._nursery: trio.Nursery | None = None
        self._zygote: _Zygote | None = None
        self._starting = trio.Lock()
        self._sending = trio.Lock()

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        await self._ensure_zygote()

    async def _ensure_zygote(self) -> _Zygote:
        async with self._starting:
            if self._zygote is None or not self._zygote.alive:
                self._zygote = await self._start_zygote()
            return self._zygote

    async def _start_zygote(self) -> _Zygote:
        assert self._nursery is not None, "start() first"
        argv = [sys.executable, "-m", "qoper8d.zygote", msgspec.json.encode(self._spec).decode()]
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            raise WorkerStartError(f"cannot start the fork server: {_why(exc)}") from None
        try:
            (lifeline_r, lifeline_w), (out_r, out_w), (err_r, err_w) = _pipes(3)
        except OSError as exc:
            ours.close()
            theirs.close()
            raise WorkerStartError(f"cannot start the fork server: {_why(exc)}") from None
        try:
            pid = await trio.to_thread.run_sync(
                _posix_spawn, argv, [out_w, err_w, theirs.fileno(), lifeline_r], self._env
            )
        except BaseException as exc:
            ours.close()
            for fd in (lifeline_w, out_r, err_r):
                os.close(fd)
            if isinstance(exc, OSError):
                raise WorkerStartError(f"cannot start the fork server: {_why(exc)}") from None
            raise
        finally:
            theirs.close()
            for fd in (lifeline_r, out_w, err_w):
                os.close(fd)
        ours.setblocking(False)
        try:
            zygote = _Zygote(pid, ours, lifeline_w)
        except OSError as exc:  # no pidfd for it (EMFILE): it must not run on unwatched
            os.kill(pid, signal.SIGKILL)  # our child, not reaped: the pid is still its own
            os.waitpid(pid, 0)  # noqa: ASYNC222 - killed: it is gone at once
            ours.close()
            for fd in (lifeline_w, out_r, err_r):
                os.close(fd)
            raise WorkerStartError(f"cannot start the fork server: {_why(exc)}") from None
        for stream, fd in (("stdout", out_r), ("stderr", err_r)):
            self._nursery.start_soon(pump_output, fd, stream, -1, pid, 0.0)
        try:
            with trio.fail_after(self._start_timeout):
                while True:
                    await trio.lowlevel.wait_readable(ours)
                    data = ours.recv(1 << 16)
                    if not data:
                        raise WorkerStartError("the fork server exited before it was ready")
                    (message,) = wire.FrameReader(wire.FromZygote).feed(data)
                    if isinstance(message, wire.Ready):
                        break
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await _reap(zygote)
            if isinstance(exc, trio.TooSlowError):
                raise WorkerStartError(
                    f"the fork server did not start within {self._start_timeout:g} s"
                ) from None
            raise
        self._nursery.start_soon(self._serve_zygote, zygote)
        log.info("forkserver.ready", pid=pid, preload=self._spec.preload)
        return zygote

    async def _serve_zygote(self, zygote: _Zygote) -> None:
        reader = wire.FrameReader(wire.FromZygote)
        sock = zygote.sock
        try:
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError:
                    data, fds = b"", []
                if not data:
                    break
                for message in reader.feed(data):
                    if isinstance(message, wire.Forked):
                        if fds:
                            zygote.reply((message.pid, fds.pop()))
                        else:
                            # It could not fork the worker (its log says why), or the pidfd
                            # it sent did not fit in our descriptor table.
                            zygote.reply(WorkerStartError("the fork server sent no pidfd"))
                    elif isinstance(message, wire.Exited):
                        zygote.exited(message)
                    elif isinstance(message, wire.Log):
                        relay(
                            log, message.level, message.event, message.fields, forkserver=zygote.pid
                        )
                for fd in fds:
                    os.close(fd)
        except trio.Cancelled:
            self._zygote = None  # the pool is going: this is a stop, not a failure
            raise
        finally:
            zygote.alive = False
            while zygote.pending:
                zygote.reply(WorkerStartError("the fork server exited"))
            # Workers it forked live on, orphaned; their exit statuses are lost with it.
            for event in zygote.exit_waiters.values():
                event.set()
            if self._zygote is zygote:
                log.error("forkserver.exit", pid=zygote.pid)
            with trio.CancelScope(shield=True):
                await _reap(zygote)

    async def launch(self, spec: wire.WorkerSpec) -> WorkerProcess:
        zygote = await self._ensure_zygote()
        fds = _Fds()
        frame = wire.encode_frame(wire.Fork(spec))
        waiting = _Reply()
        try:
            # One sender at a time, so replies come in the order of the sends; hundreds of
            # launches at once fill the fork server's queue, and wait in turn for room.
            async with self._sending:
                while True:
                    with contextlib.suppress(BlockingIOError):
                        socket.send_fds(zygote.sock, [frame], fds.child)
                        break
                    await trio.lowlevel.wait_writable(zygote.sock)
                zygote.pending.append(waiting)
        except BaseException as exc:
            fds.close_all()
            if not isinstance(exc, OSError):
                raise
            zygote.alive = False
            raise WorkerStartError(f"the fork server is gone: {exc}") from None
        fds.close_child_ends()
        # Not cancellable: the reply must be taken, or the next launch would get ours.
        with trio.CancelScope(shield=True):
            await waiting.wakeup.wait()
        reply = waiting.value
        if isinstance(reply, BaseException):
            fds.close_all()
            raise reply
        pid, pidfd = reply
        return _ForkedWorker(zygote, pid, pidfd, fds)

    async def aclose(self) -> None:
        """Stop the fork server (every worker has exited by now)."""
        zygote = self._zygote
        self._zygote = None
        if zygote is None:
            return
        with trio.CancelScope(shield=True):
            if zygote.alive:
                with contextlib.suppress(OSError):
                    zygote.sock.send(wire.encode_frame(wire.Stop()))
            with trio.move_on_after(5):
                await zygote.gone.wait()
            if not zygote.gone.is_set():
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(zygote.pidfd, signal.SIGKILL)
                await zygote.gone.wait()


async def _reap(zygote: _Zygote) -> None:
    """Kill (if need be), wait for and reap the fork server; close our ends."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(zygote.pidfd, signal.SIGKILL)
    await trio.lowlevel.wait_readable(zygote.pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PIDFD, zygote.pidfd, os.WEXITED)  # noqa: ASYNC222 - it has exited
    os.close(zygote.pidfd)
    os.close(zygote.lifeline)
    trio.lowlevel.notify_closing(zygote.sock)
    zygote.sock.close()
    zygote.gone.set()
