"""The master's side of a worker's channel: reading its answers, finishing a long write.

Pure I/O over a `WorkerHandle`'s pipes: what the bytes mean is the engine's `on_data`, and
whether a worker is paced is the engine's rule. A worker's reader task parks while the
worker is idle or while a caller reads for it (`borrowed`), so that trio's one waiter per
descriptor is never two.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from qoper8d._handle import WorkerHandle

__all__ = ["collect", "flush", "read", "read_some"]

#: A read at least this long means answers are streaming in: read again before waiting.
_BUSY_READ = 1024

OnData = Callable[[WorkerHandle, int], None]


def read_some(worker: WorkerHandle) -> int | None:
    """Read what `worker`'s pipe holds into its frame buffer: the number of bytes, 0 at
    end-of-file (a broken pipe too), None if nothing is there yet."""
    try:
        return os.readv(worker.rfd, [worker.frames.buffer()])
    except BlockingIOError:
        return None
    except OSError:
        return 0


async def read(
    worker: WorkerHandle,
    on_data: OnData,
    paced: Callable[[WorkerHandle], bool],
    hand_over: Callable[[WorkerHandle], Awaitable[None]],
    task_status: Any,
) -> None:
    """A worker's reader task: runs until cancelled by the worker's exit. Started once it
    is parked, so that the idle fast path can borrow the worker at once."""
    rfd = worker.rfd
    # While answers stream in faster than we handle them, read again right after a
    # checkpoint: more will be there, and that skips an epoll round. When they trickle
    # in (slow actions), a read would only fail: go straight to waiting.
    busy_stream = False
    while True:
        if worker.borrowed or worker.eof or not worker.busy:
            busy_stream = False
            task_status.started()  # no checkpoint between this and parking
            task_status = trio.TASK_STATUS_IGNORED
            await worker.reader.wait()
            continue
        if not busy_stream:
            await trio.lowlevel.wait_readable(rfd)
        n = read_some(worker)
        if n is None:
            busy_stream = False
            continue
        if not n:
            worker.eof = True
            continue
        on_data(worker, n)
        busy_stream = n >= _BUSY_READ
        if busy_stream:
            await trio.lowlevel.checkpoint()
        elif paced(worker):
            # The pacer reads this worker from now on, until its batch nears its end.
            await hand_over(worker)


def collect(worker: WorkerHandle, on_data: OnData) -> None:
    """Read whatever `worker` has written, without waiting (all of it, after its exit).
    Nothing more once it broke the protocol: what follows in its stream is in doubt too."""
    while worker.busy and not worker.unsent and worker.doom != "protocol error":
        room = worker.frames.buffer()
        try:
            n = os.readv(worker.rfd, [room])
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if not n:
            worker.eof = True
            return
        on_data(worker, n)
        if n < len(room):
            return  # that was all the pipe held: spare a read that would fail


async def flush(worker: WorkerHandle) -> None:
    """Write the rest of a batch the pipe did not take at once (a very large action)."""
    wfd = worker.wfd
    try:
        while worker.outbuf:
            await trio.lowlevel.wait_writable(wfd)
            try:
                sent = os.write(wfd, worker.outbuf)
            except BlockingIOError:
                continue
            worker.outbuf = worker.outbuf[sent:]
    except (trio.ClosedResourceError, OSError):
        worker.outbuf = b""
