"""The client side of docs/protocol.md, sans-IO: no sockets, no event loop; a clock given.

`Client` (poll(2)) and `AsyncClient` (anyio) are I/O loops around these, as hypercorn's trio
and asyncio servers are around its `protocol/h11.py`: they connect, move bytes between the
socket and a `ClientProtocol`, and wait; everything else is decided here, once.

- `ClientProtocol`: one connection's state. It gives requests their ids (from the client's
  counter, which outlives connections), keeps the lines waiting to be sent (`out`), decodes
  what the daemon sends (`receive_data`, every response of a read in one call), keeps the
  responses somebody waits for (`responses`, by id; the rest are dropped as they arrive),
  queues cancels for requests given up on (`give_up`), and holds why the connection ended
  (`failure`).
- `MapRun`: one `map`'s pipelining. It sends submits while its window has room, yields
  results in input order (`take`), and on leaving early cancels whatever is outstanding
  (`abandon`). Its `Window` (`qoper8d._window`) says how many may be in flight; the
  adaptive one learns from what the map observes: how fast results come, how long a
  submit waits for its answer, how big requests and answers are.

What each op sends and how its result reads is in `qoper8d._ops`.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from qoper8d import _ops
from qoper8d._chunks import consume
from qoper8d._window import OUT_BYTES, AdaptiveWindow, FixedWindow, Observed, Window
from qoper8d.errors import ConnectError, NotRunning, Qoper8Error, error_from_wire

__all__ = [
    "AdaptiveWindow",
    "ClientProtocol",
    "FixedWindow",
    "MapRun",
    "RequestId",
    "Response",
    "Window",
]

RequestId = int | str

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode


class Response(msgspec.Struct):
    id: RequestId | None = None
    ok: bool = False
    result: Any = None
    error: dict[str, Any] | None = None
    #: Set on a progress line (`{"id": ..., "progress": ...}`), which is no response.
    progress: Any = msgspec.UNSET


_decode_responses = msgspec.json.Decoder(Response).decode_lines

#: A map's submit line: id, `_ops.submit_fields`, the action (as `_ops.submit` has it).
SUBMIT = b'{"id":%d,"op":"submit"%b,"action":%b}\n'


def _error(response: Response) -> Qoper8Error:
    return error_from_wire(response.error or {"code": "error", "message": "no error given"})


def again(error: Qoper8Error) -> Qoper8Error:
    """A copy of a connection's failure to raise: every request waiting on the connection
    raises it, and one exception object raised in many places would share a traceback."""
    fresh = copy.copy(error)
    fresh.__dict__.update(error.__dict__)  # an unknown code lives on the instance
    return fresh


def closed(path: Path) -> ConnectError:
    return ConnectError("the client is closed", path=str(path))


class _LineDecoder:
    """Bytes from the daemon in, decoded responses out.

    An error line with id null is the daemon's reason for closing the connection (say
    `forbidden`); it is kept in `fatal` to be raised once the connection ends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buf = bytearray()
        self.fatal: Qoper8Error | None = None

    def feed(self, data: bytes) -> list[Response]:
        """The responses completed by `data`; `ConnectError` if they are not JSON."""
        # Only `data` is searched for a newline, so a long line arriving in many reads is
        # scanned once, not once per read.
        end = data.rfind(b"\n")
        if end < 0:
            self.buf += data
            return []
        chunk = data[: end + 1]
        if self.buf:
            chunk = bytes(self.buf) + chunk
            self.buf.clear()
        self.buf += data[end + 1 :]
        try:
            responses = _decode_responses(chunk)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConnectError(
                f"unreadable response from {self.path}: {exc}", path=str(self.path)
            ) from None
        for response in responses:
            if response.id is None:
                self.fatal = _error(response)
        return responses

    def ended(self) -> Qoper8Error:
        """Why the connection ended: the daemon's last word, or a plain hang-up."""
        return self.fatal or NotRunning(
            f"the daemon at {self.path} closed the connection before answering "
            "(it stopped, or is restarting)",
            path=str(self.path),
        )


class ClientProtocol:
    """One connection to the daemon, without the connection.

    The I/O loop sends `out` (`written` says how much went; `data_to_send` takes it all),
    hands what it reads to `receive_data` (b"" at end-of-file), and waits until the id it
    wants is in `responses` or `failure` is set. It tells `closing` before it shuts its
    sending side down, so the daemon hanging up then is no failure of the daemon's.

    It counts what it reads (`received`, `received_bytes`) and, for a map's window, times
    the round trip of one request at a time: `probe` sets the id to time, `rtt` is its
    round trip once its response is in. `clock` is read only for that.
    """

    __slots__ = (
        "clock",
        "closing",
        "decoder",
        "failure",
        "ids",
        "out",
        "path",
        "probe_id",
        "probe_sent",
        "received",
        "received_bytes",
        "reports",
        "responses",
        "rtt",
        "sent",
        "wanted",
        "watched",
    )

    def __init__(
        self, path: Path, ids: Iterator[int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.ids = ids
        self.clock = clock
        self.received = 0
        self.received_bytes = 0
        self.probe_id: RequestId | None = None
        self.probe_sent = 0.0
        self.rtt: float | None = None
        self.out: list[bytes] = []  # whole lines, waiting to be sent
        self.sent = 0  # bytes of out[0] already sent
        self.decoder = _LineDecoder(path)
        self.wanted: set[RequestId] = set()  # ids whose responses are kept
        self.responses: dict[RequestId, Response] = {}  # kept responses, to be claimed
        self.watched: set[RequestId] = set()  # submits that asked for progress lines
        self.reports: dict[RequestId, Any] = {}  # the latest progress value of each, unclaimed
        self.failure: Qoper8Error | None = None
        self.closing = False

    # -- requests ------------------------------------------------------------------------

    def send(self, body: bytes) -> int:
        """Queue a request (`body`: its line but for the id, from `qoper8d._ops`); its id,
        under which its response will be kept in `responses`. Raises the connection's
        failure if it has one."""
        if self.failure is not None:
            raise again(self.failure)
        rid = next(self.ids)
        self.out.append(b'{"id":%d,%b}\n' % (rid, body))
        self.wanted.add(rid)
        return rid

    def outcome(self, rid: int, op: _ops.Op[T]) -> T:
        """Claim the response to `rid`, a request of `op` (it must be in): its result, or
        its error raised as the `qoper8d` exception for its code."""
        response = self.responses.pop(rid)
        if not response.ok:
            raise _error(response)
        read = op.read
        return response.result if read is None else read(response.result)

    def give_up(self, rids: Iterable[RequestId], *, cancel: bool) -> bool:
        """Stop waiting for `rids`: their responses are dropped, those already in and those
        still to come; with `cancel`, a `cancel` is queued for each one not answered yet.
        True if any was."""
        responses = self.responses
        wanted = self.wanted
        queued = False
        for rid in rids:
            if responses.pop(rid, None) is None and rid in wanted:
                wanted.discard(rid)
                if cancel:
                    _, body = _ops.cancel(rid)
                    self.out.append(b'{"id":%d,%b}\n' % (next(self.ids), body))
                    queued = True
        return queued

    def probe(self, rid: RequestId) -> None:
        """Time the round trip of `rid`, just queued: `rtt` once its response is in."""
        self.probe_id = rid
        self.probe_sent = self.clock()

    # -- bytes ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything waiting to be sent, taken out of `out`."""
        data = b"".join(self.out)[self.sent :]
        self.out.clear()
        self.sent = 0
        return data

    def written(self, count: int) -> None:
        """`count` more bytes from the front of `out` were sent."""
        self.sent = consume(self.out, count + self.sent)

    def cannot_send(self) -> None:
        """The daemon takes nothing more (it hung up): drop `out`, but keep reading, for its
        last words (an error line with id null, say `forbidden`) may still be waiting."""
        self.out.clear()
        self.sent = 0

    def receive_data(self, data: bytes) -> list[Response]:
        """What was read; b"" is end-of-file. Returns every response `data` completed (the
        async loop wakes whoever waits for their ids); those wanted are kept in `responses`.
        Bytes that are not JSON lines fail the connection."""
        if not data:
            self.connection_lost(closed(self.path) if self.closing else self.decoder.ended())
            return []
        try:
            responses = self.decoder.feed(data)
        except ConnectError as exc:
            self.connection_lost(exc)
            return []
        self.received_bytes += len(data)
        self.received += len(responses)
        wanted = self.wanted
        if wanted:
            kept = self.responses
            watched = self.watched
            for response in responses:
                rid = response.id
                if rid in wanted:
                    if watched and response.progress is not msgspec.UNSET:
                        if rid in watched:
                            self.reports[rid] = response.progress  # coalesced: latest wins
                        continue
                    wanted.discard(rid)
                    kept[rid] = response
            probe = self.probe_id
            if probe is not None and probe in kept:
                self.rtt = self.clock() - self.probe_sent
                self.probe_id = None
        return responses

    def connection_lost(self, failure: Qoper8Error) -> None:
        """The connection ended (the first reason given is the one kept): nothing more will
        be sent or answered; responses already in can still be claimed."""
        if self.failure is None:
            self.failure = failure
            self.out.clear()
            self.sent = 0
            self.wanted.clear()


# -- map ---------------------------------------------------------------------------------------


class MapRun:
    """One `map`. Made when `map` is called, so bad arguments raise there; started on its
    connection when iteration begins. The I/O loop around it then does, per result,

        head = run.fill(source)     # or, from an async source: run.room(), run.submit(a)
        if head is None: return     # every result has been taken
        wait until head is in protocol.responses
        yield run.take()

    and `run.abandon()` however it ends, then sends what that queued.
    """

    __slots__ = (
        "countdown",
        "fields",
        "ids",
        "interval",
        "more",
        "observed",
        "out",
        "pending",
        "probing",
        "protocol",
        "responses",
        "return_exceptions",
        "wanted",
        "window",
    )

    protocol: ClientProtocol
    # The protocol's own containers (it never replaces them), at hand for the hot path.
    ids: Iterator[int]
    out: list[bytes]
    wanted: set[RequestId]
    responses: dict[RequestId, Response]

    def __init__(
        self,
        window: Window,
        return_exceptions: bool,
        timeout: float | None,
        max_attempts: int | None,
    ) -> None:
        self.window = window
        self.return_exceptions = return_exceptions
        # Encoded once, spliced into every submit line.
        self.fields = _ops.submit_fields(timeout, max_attempts)
        self.pending: deque[int] = deque()  # ids in flight, in input order
        self.more = True  # the source may have more actions
        self.observed = Observed()
        # Results until the window learns next (below zero: never again), out of `interval`.
        self.interval = self.countdown = window.first or -1
        self.probing = self.countdown > 0  # time the next submit's round trip

    def start(self, protocol: ClientProtocol) -> None:
        """Run on `protocol`'s connection."""
        self.protocol = protocol
        self.ids = protocol.ids
        self.out = protocol.out
        self.wanted = protocol.wanted
        self.responses = protocol.responses

    def room(self) -> int:
        """How many more actions to submit now: none once the source ran out or the
        connection is lost."""
        if not self.more or self.protocol.failure is not None:
            return 0
        room = self.window.limit - len(self.pending)
        if room > 0:
            return room
        return 0 if self.pending else 1

    def exhausted(self) -> None:
        """The source has no more actions."""
        self.more = False

    def submit(self, action: Any) -> None:
        """Send one more action. Raises the connection's failure if it has one."""
        failure = self.protocol.failure
        if failure is not None:
            raise again(failure)
        rid = next(self.ids)
        line = SUBMIT % (rid, self.fields, _encode(action))
        self.out.append(line)
        self.wanted.add(rid)
        self.pending.append(rid)
        observed = self.observed
        observed.sent += 1
        observed.sent_bytes += len(line)
        if self.probing:
            self.probing = False
            self.protocol.probe(rid)

    def fill(self, source: Iterator[Any]) -> int | None:
        """Submit actions from `source` while there is room; the id of the next result to
        take, or None when every one has been taken."""
        # `room` and `submit`, inlined: this runs once per result on the blocking client's
        # hot path.
        pending = self.pending
        if self.more and self.protocol.failure is None:
            room = self.window.limit - len(pending)
            if room > 0 or not pending:
                before = len(pending)
                nbytes = 0
                for action in source:
                    rid = next(self.ids)
                    line = SUBMIT % (rid, self.fields, _encode(action))
                    self.out.append(line)
                    self.wanted.add(rid)
                    pending.append(rid)
                    nbytes += len(line)
                    room -= 1
                    # Big actions: the window's bytes, before it has learnt their size.
                    if room <= 0 or nbytes >= OUT_BYTES:
                        break
                else:
                    self.more = False
                count = len(pending) - before
                if count:
                    observed = self.observed
                    observed.sent += count
                    observed.sent_bytes += nbytes
                    if self.probing:
                        self.probing = False
                        self.protocol.probe(pending[-count])
        return pending[0] if pending else self.head()

    def head(self) -> int | None:
        """The id of the next result to take; None when every one has been taken. Raises
        the connection's failure if it ended before the source did."""
        if self.pending:
            return self.pending[0]
        failure = self.protocol.failure
        if self.more and failure is not None:
            raise again(failure)
        return None

    def take(self) -> Any:
        """The next result in input order (its response must be in): its value, or its
        error outcome, returned with `return_exceptions` and raised without."""
        response = self.responses.pop(self.pending.popleft())
        self.countdown -= 1
        if not self.countdown:
            self._learn()
        if response.ok:
            return response.result
        error = _error(response)
        if self.return_exceptions:
            return error
        raise error

    def _learn(self) -> None:
        """Tell the window what the map has seen; it says when to tell it again."""
        observed = self.observed
        protocol = self.protocol
        observed.now = protocol.clock()
        observed.taken += self.interval
        observed.received = protocol.received
        observed.received_bytes = protocol.received_bytes
        observed.rtt = protocol.rtt
        self.interval = self.countdown = self.window.learn(observed)
        # One round trip timed at a time: the next submit, once the last one is in.
        self.probing = protocol.probe_id is None

    def abandon(self) -> bool:
        """The map ends (done, left early, or failed): give up the submits still in flight,
        queuing a `cancel` for each one not answered, so nothing the caller walked away
        from keeps a worker busy. True if there were any."""
        if not self.pending:
            return False
        self.protocol.give_up(self.pending, cancel=True)
        self.pending.clear()
        return True
