"""`qoper8ctl submit` with NDJSON on stdin: actions in, one result line out per action, in
input order, and a progress report that counts results.

- stdin a terminal: one action at a time, each result printed (and flushed) as soon as it
  arrives, before the next line is read; no progress bar, which would be drawn over the
  line being typed.
- otherwise: pipelined (`--window`, default: the client's), results written in chunks;
  when stderr is a terminal, a bar on it counts results: done, failed, and of how many
  when that is known (`--total N`, or the non-blank lines of a regular file on stdin,
  counted before the first action is sent).
- a malformed line stops the batch, naming its line; with `--keep-going` it is reported on
  stderr (line number), an error line takes its place on stdout so output lines stay
  paired with input lines, and the batch carries on; the exit status says so at the end.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from qoper8d.errors import BadRequest, Qoper8Error

if TYPE_CHECKING:
    from qoper8d.client import Client

__all__ = ["MAX_HELD_ERRORS", "submit_stream"]

#: How often the progress bar may be redrawn, in seconds.
_PROGRESS_INTERVAL = 0.1
#: Result bytes held before they are written to stdout even though more are coming.
_OUTPUT_CHUNK = 1 << 16
#: Malformed lines (`--keep-going`) whose error lines wait for the results of actions read
#: before them; past it the batch stops as it would without `--keep-going`.
MAX_HELD_ERRORS = 10_000

# Exit statuses, as qoper8ctl's (`qoper8d.ctl`): an action failed; an invalid line on stdin.
_FAILED = 1
_USAGE = 2


def complain(message: str, progress: _Progress | None = None) -> None:
    if progress is not None:
        progress.clear()
    print(message, file=sys.stderr, flush=True)


class _Progress:
    """A one-line progress report on a terminal: results done and failed, of how many when
    known, and the rate. Redrawn at most every `_PROGRESS_INTERVAL` seconds."""

    def __init__(self, stream: Any, total: int | None) -> None:
        self.stream = stream
        self.total = total
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self.shown = False

    def draw(self, done: int, failed: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.drawn_at < _PROGRESS_INTERVAL:
            return
        self.drawn_at = now
        rate = (done + failed) / max(now - self.started, 1e-9)
        text = f"{done:,} done, {failed:,} failed"
        if self.total is not None:
            share = min((done + failed) / self.total, 1.0) if self.total else 1.0
            filled = int(share * 24)
            text = f"[{'#' * filled}{'.' * (24 - filled)}] {share:4.0%}  {text} of {self.total:,}"
        self.stream.write(f"\r\x1b[K{text}, {rate:,.0f}/s")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


class _Results:
    """Result lines for stdout, in input order. Written in chunks (when `_OUTPUT_CHUNK` bytes
    wait, and whenever the next result is not in yet), or each at once when `eager`."""

    def __init__(self, out: Any, progress: _Progress | None, *, eager: bool) -> None:
        self.out = out
        self.progress = progress
        self.eager = eager
        self.buf: list[bytes] = []
        self.size = 0
        self.answered = 0  # results of actions written (or held in buf)
        self.done = 0
        self.failed = 0
        self.malformed = 0
        # Error lines of malformed lines, each after the result of the action before it.
        self.held: deque[tuple[int, bytes]] = deque()
        # When results and the bar share a terminal, the bar is cleared before results print.
        self.share_terminal = progress is not None and out.isatty()

    def _put(self, line: bytes, *, failed: bool) -> None:
        self.buf.append(line)
        self.size += len(line)
        if failed:
            self.failed += 1
        else:
            self.done += 1
        if self.eager or self.size >= _OUTPUT_CHUNK:
            self.flush()

    def add(self, line: bytes, *, failed: bool) -> None:
        self._put(line, failed=failed)
        self.answered += 1
        held = self.held
        while held and held[0][0] <= self.answered:
            self._put(held.popleft()[1], failed=True)

    def bad_line(self, after: int, number: int, why: str) -> bool:
        """A malformed line read after `after` actions: its error line, in its place. False
        when too many wait for their place already."""
        self.malformed += 1
        error = BadRequest(f"invalid JSON: {why}", line=number).to_wire()
        line = b'{"error":%b}\n' % msgspec.json.encode(error)
        if after <= self.answered:
            self._put(line, failed=True)
            return True
        if len(self.held) >= MAX_HELD_ERRORS:
            return False
        self.held.append((after, line))
        return True

    def flush(self) -> None:
        progress = self.progress
        if self.buf:
            if self.share_terminal and progress is not None:
                progress.clear()
            self.out.write(b"".join(self.buf))
            self.out.flush()
            self.buf.clear()
            self.size = 0
        if progress is not None:
            progress.draw(self.done, self.failed, force=not progress.shown)

    def finish(self) -> None:
        self.flush()
        if self.progress is not None:
            self.progress.draw(self.done, self.failed, force=True)
            self.progress.stream.write("\n")
            self.progress.stream.flush()


class _ActionLines:
    """NDJSON actions from a binary stream, one per line; blank lines are skipped.

    A malformed line stops the iteration (its description kept in `error`, so the actions
    before it still run and print before the command reports it), or with `keep_going` is
    reported and handed to `results` for its error line, and reading goes on.
    """

    def __init__(self, stream: Any, results: _Results, *, keep_going: bool) -> None:
        self.stream = stream
        self.results = results
        self.keep_going = keep_going
        self.error: str | None = None
        self.sent = 0

    def __iter__(self) -> Iterator[Any]:
        decode = msgspec.json.decode
        # readline, not the file's iterator: on a terminal, each line as soon as it is typed.
        for number, line in enumerate(iter(self.stream.readline, b""), 1):
            if not line.strip():
                continue
            try:
                action = decode(line)
            except msgspec.DecodeError as exc:
                problem = f"stdin line {number}: invalid JSON: {exc}"
                if not self.keep_going:
                    self.error = problem
                    return
                complain(problem, self.results.progress)
                if not self.results.bad_line(self.sent, number, str(exc)):
                    self.error = (
                        f"stdin line {number}: stopped: {MAX_HELD_ERRORS:,} malformed lines "
                        "already wait for the results of the actions before them"
                    )
                    return
                continue
            self.sent += 1
            yield action


def count_lines(stream: Any) -> int | None:
    """The non-blank lines left in `stream` if it is a regular file (then rewound to where
    it was), else None."""
    try:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            return None
        start = stream.tell()
    except (OSError, ValueError, AttributeError):
        return None
    count = sum(1 for line in stream if line.strip())
    stream.seek(start)
    return count


def submit_stream(client: Client, args: argparse.Namespace) -> int:
    """`qoper8ctl submit` without ACTION_JSON; its exit status."""
    stdin = sys.stdin.buffer
    typing = stdin.isatty()
    progress = None
    if sys.stderr.isatty() and not typing:
        total = args.total if args.total is not None else count_lines(stdin)
        progress = _Progress(sys.stderr, total)
    results = _Results(sys.stdout.buffer, progress, eager=typing)
    lines = _ActionLines(stdin, results, keep_going=args.keep_going)
    # Typed input: one action at a time, so each result shows before the next line is read.
    window = 1 if typing else args.window  # None: the client's own, which adapts
    encode = msgspec.json.encode
    try:
        for result in client.map(
            lines,
            return_exceptions=True,
            timeout=args.action_timeout,
            max_attempts=args.max_attempts,
            window=window,
            on_wait=results.flush,  # nothing sits in a buffer, the bar moves, while we wait
        ):
            if isinstance(result, Qoper8Error):
                results.add(b'{"error":%b}\n' % encode(result.to_wire()), failed=True)
            else:
                results.add(encode(result) + b"\n", failed=False)
    finally:
        results.finish()
    if lines.error is not None:
        complain(lines.error)
        return _USAGE
    failed = results.failed - results.malformed
    if results.malformed:
        plural = "s" if results.malformed != 1 else ""
        complain(
            f"{results.malformed} malformed line{plural}, {failed} of {lines.sent} actions failed"
        )
        return _USAGE
    if failed:
        complain(f"{failed} of {lines.sent} actions failed")
        return _FAILED
    return 0
