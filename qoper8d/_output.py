"""Worker stdout/stderr into the master's structured log, one event per line.

Each line becomes a `worker.output` event tagged with slot, pid and stream. Bytes that are
not UTF-8 are kept visible as backslash escapes; a line longer than `MAX_LINE` is cut. A
flood is read at full speed (so the worker never blocks on a full pipe) but logged at no more
than `rate` lines a second per stream; the rest are counted and reported as one
`worker.output_dropped` event per second, so logging can never stall the pool.
"""

from __future__ import annotations

import os

import structlog
import trio

__all__ = ["MAX_LINE", "Bucket", "pump_output"]

log = structlog.get_logger("qoper8d.worker")

MAX_LINE = 8192


class Bucket:
    """At most `rate` events a second (0: all), the rest counted in `dropped`."""

    __slots__ = ("dropped", "rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = trio.current_time()
        self.dropped = 0

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        if self.tokens < 1:
            now = trio.current_time()
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens < 1:
                self.dropped += 1
                return False
        self.tokens -= 1
        return True


async def pump_output(fd: int, stream: str, slot: int, pid: int, rate: float) -> None:
    """Read `fd` (a worker's stdout or stderr) until end-of-file, logging each line."""
    bucket = Bucket(rate)
    partial = b""
    reported = trio.current_time()

    def emit(raw: bytes) -> None:
        if bucket.take():
            line = raw[:MAX_LINE].decode("utf-8", "backslashreplace")
            if len(raw) > MAX_LINE:
                line += f" [... {len(raw) - MAX_LINE} more bytes]"
            log.info("worker.output", slot=slot, pid=pid, stream=stream, line=line)

    def report_dropped() -> None:
        if bucket.dropped:
            log.warning(
                "worker.output_dropped", slot=slot, pid=pid, stream=stream, lines=bucket.dropped
            )
            bucket.dropped = 0

    def consume(data: bytes) -> None:
        nonlocal partial
        lines = (partial + data).split(b"\n")
        partial = lines.pop()
        if len(partial) > MAX_LINE:
            emit(partial)
            partial = b""
        for raw in lines:
            emit(raw)

    stream_in = trio.lowlevel.FdStream(fd)
    try:
        while True:
            data = await stream_in.receive_some(65536)
            if not data:
                break
            consume(data)
            now = trio.current_time()
            if bucket.dropped and now - reported >= 1.0:
                report_dropped()
                reported = now
    except trio.Cancelled:
        # The pool is closing: log what is already in the pipe, without waiting for more.
        try:
            while data := os.read(fd, 65536):
                consume(data)
        except OSError:
            pass
        raise
    finally:
        if partial:
            emit(partial)
        report_dropped()
        await _close(stream_in)


async def _close(stream: trio.lowlevel.FdStream) -> None:
    with trio.CancelScope(shield=True):
        await stream.aclose()
