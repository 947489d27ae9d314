"""Log events for people: what the daemon writes when stderr is a terminal (or
`monitor.log_format = "console"`, or `FORCE_COLOR`).

Each event is one short line: the time (UTC), the level, the event's name, then its fields
as `key=value`. A `pool.snapshot` is one sentence (`running: 2 busy, 2 idle, queue 17, in
1,240/s, done 1,238/s, failed 2.0/s, 0 restarts`), a line a worker printed is shown as it was
printed, after its slot, pid and stream; a field that holds several lines (a traceback, an
exception) follows on lines of its own, indented, never as one escaped line.

Everything shown comes from handlers and clients as much as from us, so nothing reaches
the terminal raw: control characters (escape sequences, carriage returns, C1 controls) and
the characters that reorder text (bidi overrides) are shown as `\\xNN` / `\\uNNNN` escapes.

Colour follows no-color.org and force-color.org, as CPython's own `_colorize` does:
`NO_COLOR` set and not empty, no colour; else `FORCE_COLOR` set and not empty, colour even
when stderr is not a terminal; else `TERM=dumb`, none; else colour when the stream is a
terminal. Under `log_format = "auto"`, `FORCE_COLOR` also picks these lines over JSON
(`console_wanted`); an explicit `"json"` always wins.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, MutableMapping
from typing import IO, Any

__all__ = ["ConsoleRenderer", "clean", "console_wanted", "snapshot_line", "use_colour"]

#: The longest a field's value is shown on its line, in characters; the JSON log has it all.
MAX_VALUE = 1000
#: Fields whose lines are shown under their event without a heading.
_BLOCKS = ("traceback", "exception", "stack")

_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_BARE = re.compile(r"[^\s\"'=\\]+")

_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_KEY = "\x1b[36m"
_LEVELS = {
    "debug": "\x1b[2m",
    "info": "\x1b[32m",
    "warning": "\x1b[33m",
    "error": "\x1b[31m",
    "critical": "\x1b[1;31m",
}


def use_colour(stream: IO[str]) -> bool:
    """Whether console logs on `stream` get colour (see the module docstring)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def console_wanted(stream: IO[str]) -> bool:
    """Whether `log_format = "auto"` means console lines on `stream`: a terminal, or
    `FORCE_COLOR` set and not empty."""
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str) -> str:
    """`text` safe to show on a terminal: one line, no control or reordering characters."""
    return _UNSAFE.sub(_escape, text)


def _value(value: Any) -> str:
    if isinstance(value, str) and _BARE.fullmatch(value):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    if len(text) > MAX_VALUE:
        text = f"{text[:MAX_VALUE]}... [{len(text) - MAX_VALUE} more characters]"
    return clean(text)


def _rate(per_second: float) -> str:
    if per_second >= 10:
        return f"{per_second:,.0f}"
    return f"{per_second:.1f}".removesuffix(".0")


def snapshot_line(snapshot: Mapping[str, Any]) -> str:
    """A `pool.snapshot` as one sentence: state, workers by state, queue, rates, restarts."""
    states: dict[str, int] = {"busy": 0, "idle": 0}
    for worker in snapshot.get("workers", ()):
        state = str(worker.get("state"))
        states[state] = states.get(state, 0) + 1
    parts = [f"{count} {state}" for state, count in states.items()]
    parts[0] = f"{snapshot.get('state')}: {parts[0]}"
    parts.append(f"queue {int(snapshot.get('queued', 0)):,}")
    rates = snapshot.get("rates")
    if isinstance(rates, Mapping):
        outcomes = rates.get("outcomes", {})
        done = float(outcomes.get("result", 0))
        failed = sum(float(v) for k, v in outcomes.items() if k != "result")
        parts.append(f"in {_rate(float(rates.get('submitted', 0)))}/s")
        parts.append(f"done {_rate(done)}/s")
        parts.append(f"failed {_rate(failed)}/s")
    parts.append(f"{int(snapshot.get('restarts', 0)):,} restarts")
    return clean(", ".join(parts))


class ConsoleRenderer:
    """A structlog renderer: an event dict in, the text of one event (a line, or a line and
    its blocks) out."""

    def __init__(self, colours: bool) -> None:
        self.colours = colours

    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colours else text

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        fields = dict(event_dict)
        stamp = str(fields.pop("timestamp", ""))
        level = str(fields.pop("level", method))
        event = clean(str(fields.pop("event", "")))
        head = [
            self._paint(_DIM, stamp[11:23] if len(stamp) >= 23 else stamp),
            self._paint(_LEVELS.get(level, ""), f"{level:<8}"),
            self._paint(_BOLD, event),
        ]
        blocks: list[tuple[str, str]] = []
        if event == "pool.snapshot":
            head.append(snapshot_line(fields))
            fields = {}
        elif event == "worker.output" and isinstance(fields.get("line"), str):
            where = f"[slot {fields.pop('slot', '?')} pid {fields.pop('pid', '?')}"
            where += f" {fields.pop('stream', '?')}]"
            head += [self._paint(_DIM, clean(where)), clean(fields.pop("line"))]
        for key, value in fields.items():
            if isinstance(value, str) and "\n" in value.strip("\n"):
                blocks.append((key, value))
            else:
                head.append(f"{self._paint(_KEY, clean(str(key)))}={_value(value)}")
        lines = [" ".join(part for part in head if part)]
        for key, text in blocks:
            if key not in _BLOCKS:
                lines.append(f"  {self._paint(_KEY, clean(str(key)))}:")
            lines.extend(f"    {clean(line)}" for line in text.strip("\n").split("\n"))
        return "\n".join(lines)
