"""What a worker tells the master besides its results: how long actions ran, progress, and
a handler's exception (bounded text).

Both are made to cost the bulk path nothing it can measure. Durations are counted where
they are measured, in the worker, into a list indexed by a bit length (one clock read and
one increment an action) and sent as one `Timed` frame per batch, whatever its length: just
before the answer that ends the batch, so a batch's last outcome never overtakes its
timings, and mid-batch at most every `wire.REPORT_INTERVAL` seconds. An action's duration
runs from the end of its predecessor's (or from the batch's arrival) to its answer being
ready: its handler, the encoding of its result, and the write of the answer before it.

`progress(value)` is for handlers. The value is encoded and checked at once (so a bad one
raises in the handler), then sent at once unless the worker sent one less than
`REPORT_INTERVAL` seconds ago; then it waits as the one pending value, replaced by any later
report, and goes out just before the action's answer (or at the first report after the
interval). So a handler reporting in a tight loop writes at most one progress frame per
interval, the pipe never fills with them, and the last value reported always arrives
before the outcome. Nothing here imports trio: a worker's handler pays for none of it.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from itertools import compress
from typing import Any

import msgspec

from qoper8d import wire

__all__ = ["MAX_TEXT", "Reports", "cut", "describe", "progress", "raised"]

_encode = msgspec.json.Encoder().encode
#: Bit lengths a worker counts under: `((ns - 1) // 1000).bit_length()` of any duration a
#: 64-bit clock can measure (the master merges them into `DURATION_BOUNDS`' buckets).
_BITS = 64
_ZEROS = [0] * _BITS
_INTERVAL_NS = int(wire.REPORT_INTERVAL * 1e9)

#: The worker's `Reports` while this process is a worker, else None.
_current: Reports | None = None


def progress(value: Any) -> None:
    """Report the progress of the action this worker is running: any JSON value of at most
    `MAX_PROGRESS_BYTES` (4096) bytes as JSON, say `{"done": 3, "of": 10}`.

    Best-effort: reports faster than one per `REPORT_INTERVAL` (50 ms) are coalesced, the
    latest value winning, and the last one always arrives before the action's outcome. Call
    it from the handler's own thread while it runs. Raises `TypeError` for a value JSON
    cannot hold, `ValueError` for one too long, `RuntimeError` outside a running action
    (in `setup()`, in another thread, or in a process that is not a qoper8d worker).
    """
    reports = _current
    if reports is None:
        raise RuntimeError("qoper8d.progress() is for handlers: this is not a qoper8d worker")
    reports.progress(value)


#: The most characters of an exception's message, and of its traceback, sent to the master.
MAX_TEXT = 1 << 16


def describe(exc: BaseException) -> tuple[str, str, str]:
    """An exception as type, message and traceback text: bounded, and never raising (a
    handler's exception may have a `__str__` that raises, or be nested deeply)."""
    kind = type(exc).__qualname__
    try:
        message = str(exc)
    except Exception:
        message = f"<{kind} whose str() raised>"
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = f"<the traceback of {kind} could not be formatted>"
    return cut(kind), cut(message), cut(text)


def cut(text: str) -> str:
    """`text`, at most about `MAX_TEXT` characters of it, and only what UTF-8 can carry (a
    lone surrogate is shown as an escape instead of failing the frame's encoding)."""
    if len(text) > MAX_TEXT:
        half = MAX_TEXT // 2
        text = f"{text[:half]}\n[... {len(text) - MAX_TEXT} characters ...]\n{text[-half:]}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def raised(exc: Exception) -> bytes:
    return wire.encode_frame(wire.Raised(*describe(exc)))


class Reports:
    """One worker's durations counted so far and its pending progress value."""

    __slots__ = (
        "_write",
        "counts",
        "pending",
        "progress_at",
        "report_at",
        "running",
        "since",
        "thread",
    )

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        #: Actions since the last `Timed`, by the bit length of their whole microseconds.
        self.counts = [0] * _BITS
        #: The clock (ns) when the actions counted in `counts` began.
        self.since = 0
        #: The clock (ns) past which the next answer carries a `Timed` frame: 0 while a
        #: progress value is pending, so that it goes out no later than that answer.
        self.report_at = 0
        #: A progress frame not sent yet (b"": none).
        self.pending = b""
        #: When the next progress frame may be written at once.
        self.progress_at = 0
        #: An action is running (set per batch by the worker's loop).
        self.running = False
        self.thread = threading.get_ident()

    def install(self) -> None:
        """This process is a worker: `progress()` reports here from now on."""
        global _current
        _current = self

    def start(self, now: int) -> None:
        """A batch starts at `now` (every earlier count was flushed with its last answer)."""
        self.since = now
        if not self.pending:
            self.report_at = now + _INTERVAL_NS
        self.running = True

    def flush(self, now: int) -> bytes:
        """The frames to write before the next answer: the pending progress value, if any,
        and a `Timed` frame for every action counted up to `now`."""
        counts = self.counts
        merged: dict[int, int] = {}
        for bits in compress(range(_BITS), counts):
            bucket = wire.bucket_of_bits(bits)
            merged[bucket] = merged.get(bucket, 0) + counts[bits]
        counts[:] = _ZEROS
        pairs = [x for bucket in sorted(merged) for x in (bucket, merged[bucket])]
        out = self.pending + wire.encode_timed(now - self.since, pairs)
        self.pending = b""
        self.since = now
        self.report_at = now + _INTERVAL_NS
        return out

    def progress(self, value: Any) -> None:
        if not self.running or threading.get_ident() != self.thread:
            raise RuntimeError(
                "qoper8d.progress() reports on the action running: call it from the handler "
                "while it runs (not from setup(), teardown() or another thread)"
            )
        try:
            raw = _encode(value)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise TypeError(f"a progress value must be JSON-compatible: {exc}") from None
        if len(raw) > wire.MAX_PROGRESS_BYTES:
            raise ValueError(
                f"a progress value is at most {wire.MAX_PROGRESS_BYTES} bytes as JSON; "
                f"this one is {len(raw)}"
            )
        frame = wire.encode_progress(raw)
        now = time.perf_counter_ns()
        if now >= self.progress_at:
            self.pending = b""
            self._write(frame)
            self.progress_at = now + _INTERVAL_NS
        else:
            self.pending = frame
            self.report_at = 0
