"""Structured logs that never block the master, and periodic pool snapshots.

Every event is a structlog event: JSON lines when stderr is not a terminal (or
`monitor.log_format = "json"`), short readable lines otherwise, or under `FORCE_COLOR`
(`qoper8d._console`). Inside the daemon's trio run, a rendered line is only appended to a
bounded in-memory queue; one task writes the queue to stderr through a non-blocking
descriptor. A slow or stuck reader of stderr (a full pipe, a paused terminal) therefore
delays log lines, never supervision; past `MAX_BACKLOG` lines the newest are dropped and
counted, and a `log.dropped` event says how many.

`serve_snapshots` logs one `pool.snapshot` event every `monitor.interval` seconds, with the
same fields as `qoper8ctl status --json` plus `rates`: submits and outcomes per second since
the previous snapshot (`status` has the counters; rates need an interval, which only the
monitor has). On a console the event is one sentence (`qoper8d._console`).
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import structlog
import trio

from qoper8d._console import ConsoleRenderer, console_wanted, use_colour
from qoper8d._wakeup import Wakeup

__all__ = [
    "LogWriter",
    "Rates",
    "configure_logging",
    "level_number",
    "relay",
    "serve_snapshots",
    "set_level",
]

#: Lines held for a slow stderr before new ones are dropped.
MAX_BACKLOG = 10_000

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
#: Keys of a log event that fields relayed from another process must not overwrite.
_OWN_KEYS = frozenset({"event", "level", "slot", "pid", "timestamp", "exc_info"})


def set_level(name: str) -> None:
    """Log from level `name` up from now on (a reload's `monitor.log_level`)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level_number(name)))


def level_number(name: str) -> int:
    """The logging level a name stands for (`info` for a name it does not know)."""
    return _LEVELS.get(name, 20)


def relay(log: Any, level: str, event: str, fields: dict[str, Any], **tags: Any) -> None:
    """Log an event that another process (a worker, the fork server) sent us, with our
    `tags`; its fields are never trusted to leave an event's own keys alone (a colliding
    one is renamed `field_<key>`)."""
    safe = {(f"field_{k}" if k in _OWN_KEYS or k in tags else k): v for k, v in fields.items()}
    log.log(level_number(level), event, **tags, **safe)


class LogWriter:
    """Where rendered log lines go: straight to the stream outside trio, queued inside it."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lines: deque[str] = deque()
        self._writer = Wakeup()
        self._serving = False
        self.dropped = 0
        #: The line that says how many lines were dropped, in the log's own format.
        self.dropped_line: Callable[[int], str] = lambda count: (
            f'{{"event": "log.dropped", "level": "warning", "lines": {count}}}'
        )

    def msg(self, message: str) -> None:
        if not self._serving:
            self._stream.write(message + "\n")
            self._stream.flush()
            return
        if len(self._lines) >= MAX_BACKLOG:
            self.dropped += 1
            return
        self._lines.append(message)
        self._writer.wake()

    # structlog calls the method named after the level; they all mean the same here.
    debug = info = warning = warn = error = critical = exception = log = msg

    async def serve(self) -> None:
        """Write queued lines until cancelled; then write what is left, synchronously."""
        self._stream.flush()
        fd = os.dup(self._stream.fileno())
        out = trio.lowlevel.FdStream(fd)  # non-blocking: a full pipe parks us, not the loop
        self._serving = True
        try:
            while True:
                if self.dropped:
                    count, self.dropped = self.dropped, 0
                    self._lines.append(self.dropped_line(count))
                if not self._lines:
                    await self._writer.wait()
                    continue
                chunk = "\n".join(self._lines) + "\n"
                self._lines.clear()
                await out.send_all(chunk.encode("utf-8", "backslashreplace"))
        finally:
            self._serving = False
            with trio.CancelScope(shield=True):
                await out.aclose()
            for line in self._lines:
                self._stream.write(line + "\n")
            self._lines.clear()
            self._stream.flush()


class _Factory:
    def __init__(self, writer: LogWriter) -> None:
        self._writer = writer

    def __call__(self, *args: Any) -> LogWriter:
        return self._writer


def configure_logging(
    log_format: str = "auto", level: str = "info", stream: IO[str] | None = None
) -> LogWriter:
    """Set up structlog for the daemon; returns the writer whose `serve()` task must run
    inside the trio run for logging to stay non-blocking."""
    stream = stream or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not console_wanted(stream))
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else ConsoleRenderer(use_colour(stream))
    )
    writer = LogWriter(stream)
    if not use_json:
        writer.dropped_line = lambda count: renderer(
            None,
            "warning",
            {
                "timestamp": datetime.now(UTC).isoformat(),
                "level": "warning",
                "event": "log.dropped",
                "lines": count,
            },
        )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=_Factory(writer),
        cache_logger_on_first_use=False,
    )
    return writer


class Rates:
    """Per-second rates of submits and of each outcome between one snapshot and the next
    (the first: since the pool started), measured on the snapshots' own `uptime`."""

    def __init__(self) -> None:
        self._uptime = 0.0
        self._submitted = 0
        self._outcomes: dict[str, int] = {}

    def __call__(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """The `rates` of `snapshot`: `seconds` covered, `submitted` and `outcomes` (by
        name, as in the snapshot) per second."""
        uptime = float(snapshot.get("uptime", 0.0))
        submitted = int(snapshot.get("submitted", 0))
        outcomes: dict[str, int] = dict(snapshot.get("outcomes", {}))
        seconds = uptime - self._uptime
        per = 1.0 / seconds if seconds > 0 else 0.0
        # Counters only grow; a smaller one (a pool started afresh) starts the count again.
        if submitted < self._submitted or seconds < 0:
            self._submitted, self._outcomes = 0, {}
            seconds, per = uptime, (1.0 / uptime if uptime > 0 else 0.0)
        rates = {
            "seconds": round(seconds, 3),
            "submitted": round((submitted - self._submitted) * per, 3),
            "outcomes": {
                name: round((count - self._outcomes.get(name, 0)) * per, 3)
                for name, count in outcomes.items()
            },
        }
        self._uptime, self._submitted, self._outcomes = uptime, submitted, outcomes
        return rates


async def serve_snapshots(
    snapshot: Callable[[], dict[str, Any]],
    interval: Callable[[], float],
) -> None:
    """Log `pool.snapshot` every `interval()` seconds (read each time: reload may change it),
    with the `rates` since the previous one."""
    log = structlog.get_logger("qoper8d.monitor")
    rates = Rates()
    while True:
        await trio.sleep(interval())
        fields = snapshot()
        fields["rates"] = rates(fields)
        log.info("pool.snapshot", **fields)
