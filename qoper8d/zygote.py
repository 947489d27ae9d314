"""The fork server: a warm interpreter that forks new workers in about a millisecond.

Started by the master as `python -m qoper8d.zygote SPEC_JSON`. A fresh interpreter with
msgspec costs 60-80 ms here before it runs a line of handler code; this process pays that
once, then forks each worker already warm (and, with `pool.preload`, with the handler's
modules imported too). Each forked worker runs `worker.serve()` exactly as a spawned one.

It talks to the master over a SOCK_SEQPACKET socket (fd 3), one message per packet:
`Fork` arrives with the worker's five descriptors attached; `Forked` goes back with a pidfd
for the new worker, opened before the child can possibly be reaped, so the master never
signals a recycled pid. Every `Fork` gets its `Forked`: one without a pidfd when the worker
could not be forked (its descriptors lost to a full table, fork() or pidfd_open() failing),
which fails that start only. SIGCHLD wakes the loop (set_wakeup_fd); each exited child is
first inspected with WNOWAIT, its process group killed while its pid is still reserved, and
only then reaped and reported as `Exited`. Like a worker, it dies with the master (lifeline, fd 4).

It is its workers' subreaper (PR_SET_CHILD_SUBREAPER): what a handler forked that left its
worker's process group (setsid(), daemonising) is out of the reach of that killpg, but once
its parent is gone it becomes our child instead of init's. Such orphans are reaped quietly
(`Exited` is only ever about a worker the master asked for) and left alone while the pool
runs — an orphan cannot be told to be a dead worker's rather than a live one's — and killed
when we stop (`Stop`, or the master closing the channel), with their own children as those
come to us in turn, until none is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import select
import signal
import socket
import sys
import traceback

import msgspec

from qoper8d import wire, worker

__all__ = ["main"]

#: Descriptors a forked worker gets, in order, as fds 1 to 5.
_WORKER_FDS = 5
_EXIT_CHILD_FAILED = 70
#: prctl(2): orphaned descendants become our children, not init's.
_PR_SET_CHILD_SUBREAPER = 36


def _send(sock: socket.socket, message: wire.FromZygote, fds: list[int] | None = None) -> None:
    frame = wire.encode_frame(message)
    if fds:
        socket.send_fds(sock, [frame], fds)
    else:
        sock.send(frame)


def _fork_worker(spec: wire.WorkerSpec, fds: list[int]) -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid:
        return pid
    # The child: never return into the fork server's loop, whatever happens.
    code = _EXIT_CHILD_FAILED
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        # Park the descriptors above the child's range first, so no dup2 below overwrites one
        # not yet copied; just above it, so that a low RLIMIT_NOFILE still has room.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, _WORKER_FDS + 1) for fd in fds]
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for target, source in enumerate(high, start=1):
            os.dup2(source, target)
        # Drop everything else: the server's socket, its lifeline, other workers' ends.
        os.closerange(_WORKER_FDS + 1, os.sysconf("SC_OPEN_MAX"))
        code = worker.serve(
            msgspec.structs.replace(spec, from_master_fd=3, to_master_fd=4, lifeline_fd=5)
        )
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fork(sock: socket.socket, spec: wire.WorkerSpec, fds: list[int], workers: set[int]) -> None:
    """Fork a worker and reply `Forked` with its pidfd, or without one if that failed."""
    if len(fds) != _WORKER_FDS:
        # Lost on the way: our descriptor table was full when the message came (the kernel
        # drops what does not fit). The master hears of it; we carry on.
        print(f"qoper8d fork server: a Fork came with {len(fds)} descriptors", file=sys.stderr)
        _send(sock, wire.Forked(0))
        return
    try:
        pid = _fork_worker(spec, fds)
    except OSError as exc:  # EAGAIN: out of processes or memory
        print(f"qoper8d fork server: cannot fork a worker: {exc}", file=sys.stderr)
        _send(sock, wire.Forked(0))
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:  # EMFILE
        # Not reaped yet, so the pid is still this child's.
        os.kill(pid, signal.SIGKILL)
        print(f"qoper8d fork server: no pidfd for a worker: {exc}", file=sys.stderr)
        _send(sock, wire.Forked(0))
        return
    workers.add(pid)
    _send(sock, wire.Forked(pid), [pidfd])
    os.close(pidfd)


def _reap(sock: socket.socket, workers: set[int]) -> None:
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        pid = info.si_pid
        if pid not in workers:
            # An orphan we adopted, ended: reaped, and no news to the master, which never
            # knew it. (A worker we could not give a pidfd for ends here too.)
            os.waitpid(pid, 0)
            continue
        workers.discard(pid)
        # Still a zombie: its pid and process group id cannot have been reused yet.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if info.si_code == os.CLD_EXITED:
            _send(sock, wire.Exited(pid, info.si_status, None))
        else:
            _send(sock, wire.Exited(pid, None, info.si_status))


def _become_subreaper() -> None:
    import ctypes  # the fork server's alone: workers never need it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = os.strerror(ctypes.get_errno())
        print(
            f"qoper8d fork server: not a subreaper ({error}): escapees go to init", file=sys.stderr
        )


def _children() -> set[int]:
    """Our children (zombies too), as the kernel lists them, or as /proc says of each
    process's parent where it does not (no CONFIG_PROC_CHILDREN)."""
    found: set[int] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", "rb") as f:
                found.update(int(pid) for pid in f.read().split())
    except OSError:
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            # The command may hold spaces and parentheses: the parent is after the last ")".
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == me:
                found.add(int(entry))
    return found


def _stop_strays(workers: set[int]) -> None:
    """Kill and reap every child that is not a worker we still serve: orphans we adopted as
    subreaper. Each one's children come to us as it dies, so again until none is left."""
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG) is not None:
                pass  # the dead first, workers among them: nobody waits for their news now
        strays = _children() - workers
        if not strays:
            return
        for pid in strays:
            # Its own process group too, if it made one (setsid): not reaped, it still owns
            # that group id, so the group cannot be anyone else's.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in strays:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def serve(spec: wire.ZygoteSpec) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker.set_process_name("qoper8d-forksrv", "qoper8d: fork server")
    _become_subreaper()
    worker.arm_lifeline(spec.lifeline_fd)
    worker.extend_path(spec.handler_path)
    for name in spec.preload:
        importlib.import_module(name)
    sock = socket.socket(fileno=spec.control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    _send(sock, wire.Ready(os.getpid()))
    reader = wire.FrameReader(wire.ToZygote)
    workers: set[int] = set()  # forked, not yet reaped
    while True:
        try:
            readable, _, _ = select.select([sock.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            os.read(wake_r, 4096)
            _reap(sock, workers)
        if sock.fileno() in readable:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, _WORKER_FDS)
            if not data:
                _stop_strays(workers)
                return 0  # the master closed the channel: we are done
            for message in reader.feed(data):
                if isinstance(message, wire.Fork):
                    _fork(sock, message.spec, fds, workers)
                elif isinstance(message, wire.Stop):
                    _stop_strays(workers)
                    return 0
                else:
                    print(f"qoper8d fork server: unexpected {message!r}", file=sys.stderr)
            for fd in fds:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    return worker.run_with_spec(argv, wire.ZygoteSpec, serve, "qoper8d.zygote")


if __name__ == "__main__":
    sys.exit(main())
