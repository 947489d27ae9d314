"""One client of the control socket: reading its requests, its bounds, writing its answers.

A connection is two tasks, a reader and a writer, and the submits in between. What a client
can make the daemon hold is bounded, each bound named in the configuration:

- a request line: `server.max_message_bytes`, and a started line must end within
  `server.read_timeout`;
- answers not yet sent: `server.max_unsent_bytes`. Past it the connection's queued actions
  are held (the pool dispatches other clients' work past them) and its requests are no
  longer read; both resume once its unsent bytes fall below half the bound. Answers are
  never dropped while the connection is open;
- a client that reads nothing for `server.write_timeout` while answers wait is disconnected
  (logged; its queued actions are cancelled) and its slot is freed at once.

A line that is not JSON (or not UTF-8), is too long, or is not finished in time gets one
error line with `"id": null`, and the connection closes once that line is written. A JSON
line that is not a valid request gets a `bad_request` answer and the connection carries on.
Requests are decoded in one pass per read, actions included, with the same decoder a worker
uses (msgspec's JSON), so an action a worker could not decode is refused here; the pool then
encodes it for the worker, which can always decode what the pool encoded.

After end-of-file the connection answers every request it has read and then closes (a client
that only shut down its sending side still gets its answers, then EOF); a client that hung
up entirely has its queued actions cancelled.
"""

from __future__ import annotations

import os
import re
import select
import time
from typing import Any, Protocol

import msgspec
import structlog
import trio

from qoper8d._chunks import consume
from qoper8d._jobs import Job
from qoper8d._wakeup import Wakeup
from qoper8d.config import ServerConfig
from qoper8d.errors import ActionError

__all__ = ["Connection", "Request", "error_line", "result_line"]

log = structlog.get_logger("qoper8d.control")

#: A read at least this long means requests are streaming in: let others run before reading on.
_BUSY_READ = 4096
#: Most seconds a connection being closed waits for its client to take its last answers.
FINAL_FLUSH = 5.0
#: Buffers handed to one writev(2), under Linux's IOV_MAX of 1024.
_MAX_IOV = 512
_TOO_DEEP = "the request is nested too deeply"


class Request(msgspec.Struct, frozen=True):
    """One request line. Fields an op does not use are ignored."""

    id: int | str
    op: str
    #: Decoded as a worker would decode it, so that what a worker cannot hold is refused here.
    action: Any = msgspec.UNSET
    timeout: float | None = None
    max_attempts: int | None = None
    target: int | str | None = None
    size: int | None = None
    grace: float | None = None
    #: A submit that wants `{"id": ..., "progress": ...}` lines before its answer.
    progress: bool = False


class _Id(msgspec.Struct):
    """Just the id of a line that is not a valid request, to answer it by."""

    id: msgspec.Raw = msgspec.Raw(b"null")


_decode_requests = msgspec.json.Decoder(Request).decode_lines
_decode_request = msgspec.json.Decoder(Request).decode
_decode_raw = msgspec.json.Decoder(msgspec.Raw).decode
_decode_id = msgspec.json.Decoder(_Id).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
#: JSON strings, for counting brackets outside them.
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')


def error_line(id_json: bytes, err: dict[str, Any]) -> bytes:
    return b'{"id":%b,"ok":false,"error":%b}\n' % (id_json, _encode(err))


def result_line(id_json: bytes, result: Any) -> bytes:
    return b'{"id":%b,"ok":true,"result":%b}\n' % (id_json, _encode(result))


class Front(Protocol):
    """What a connection needs from the server: the pool's hold and withdraw, and ops."""

    def handle(self, conn: Connection, request: Request) -> None:
        """Answer `request` (now, or from a task of the server's)."""

    async def submit_direct(self, conn: Connection, request: Request) -> None:
        """A lone submit: on an idle pool this task runs it and answers it."""

    def submit_all(self, conn: Connection, requests: list[Request]) -> bool:
        """If `requests` are all plain submits that can all be accepted: accept them in one
        go and return True; else nothing happens (each is then handled on its own)."""

    def hold(self, conn: Connection) -> None: ...

    def release(self, conn: Connection) -> None: ...

    def withdraw(self, conn: Connection) -> None: ...


class Connection:
    """One client, from accept to close (see the module docstring)."""

    def __init__(
        self, sock: trio.socket.SocketType, config: ServerConfig, front: Front, spin: float
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.config = config
        self.front = front
        self.spin = spin
        self.max_unsent = config.max_unsent_bytes
        #: Answers waiting to be sent, oldest first, and their bytes.
        self.out: list[bytes] = []
        self.unsent = 0
        #: When the writer last made progress, or when answers started waiting.
        self.progress_at = 0.0
        #: Submits still waiting for their outcome, by the JSON text of their id.
        self.pending: dict[bytes, Job] = {}
        #: The ids of pending submits that asked for progress lines.
        self.watching: set[bytes] = set()
        #: Progress lines held back while answers wait to be sent, the latest per id (at
        #: most one per running action; counted in `unsent`).
        self.coalesced: dict[bytes, bytes] = {}
        #: The client may still be sent answers (False once it is gone or given up on).
        self.open = True
        #: Its queued actions are held: it has `max_unsent_bytes` waiting.
        self.held = False
        #: The writer task, parked while there is nothing to write.
        self._writer = Wakeup()
        #: Set when output drains below half the bound, when pending empties, on close.
        self._changed: trio.Event | None = None
        self._scope: trio.CancelScope | None = None

    # -- the sink side: outcomes of this connection's submits, from the pool --------------

    def result(self, job: Job, payload: msgspec.Raw, worker: Any) -> None:
        self.pending.pop(job.tag, None)
        line = b'{"id":%b,"ok":true,"result":%b}\n' % (job.tag, payload)
        self.send(self.unwatch(job.tag) + line if self.watching else line)

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Any) -> None:
        pop = self.pending.pop
        lines = []
        for job, payload in zip(jobs, payloads, strict=True):
            pop(job.tag, None)
            lines.append(b'{"id":%b,"ok":true,"result":%b}\n' % (job.tag, payload))
        if self.watching:
            lines[:0] = map(self.unwatch, [job.tag for job in jobs])
        self.send(b"".join(lines))

    def error(self, job: Job, err: ActionError, worker: Any) -> None:
        self.pending.pop(job.tag, None)
        line = error_line(job.tag, err.to_wire())
        self.send(self.unwatch(job.tag) + line if self.watching else line)

    def progress(self, job: Job, value: msgspec.Raw) -> None:
        """The handler of `job` reported `value`: a line for the client if it asked, sent
        at once when nothing else waits to be sent, else held back as the latest for its
        id until what waits is written (so a slow reader gets one line per action, not one
        per report). The line held back goes out just before the submit's answer."""
        tag = job.tag
        if tag not in self.watching or not self.open:
            return
        line = b'{"id":%b,"progress":%b}\n' % (tag, value)
        if not self.out:
            self.send(line)
            return
        held = self.coalesced.get(tag)
        if held is not None:
            self.unsent -= len(held)
        self.coalesced[tag] = line
        self.unsent += len(line)
        if self.unsent >= self.max_unsent and not self.held:
            self.held = True
            self.front.hold(self)

    def watch(self, tag: bytes) -> None:
        """The submit of id `tag` asked for progress lines."""
        self.watching.add(tag)

    def unwatch(self, tag: bytes) -> bytes:
        """The submit of id `tag` has its answer: the progress line held back for it (b""
        if none), to be sent just before that answer."""
        self.watching.discard(tag)
        held = self.coalesced.pop(tag, b"")
        self.unsent -= len(held)
        return held

    # -- writing -----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue `data` for the client (written at once if the socket takes it)."""
        if not self.open:
            return  # it is gone: nobody to tell
        if not self.out:
            if self._writer.waiting:
                # The writer is idle: write from here rather than wake it (a task hop per
                # answer). Whatever the socket does not take, the writer sends in order.
                try:
                    sent = os.write(self.fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self.gone()
                    return
                if sent == len(data):
                    if self._changed is not None:
                        self._poke()
                    return
                data = data[sent:]
            self.progress_at = trio.current_time()
        self.out.append(data)
        self.unsent += len(data)
        if self.unsent >= self.max_unsent and not self.held:
            self.held = True
            self.front.hold(self)
        self._writer.wake()

    async def _write(self) -> None:
        """The writer task: sends what waits, as much per call as the socket takes."""
        fd = self.fd
        while self.open:
            if not self.out:
                self._poke()
                await self._writer.wait()
                continue
            sent = self._write_some()
            if sent is None:
                return
            if sent:
                self._sent(sent)
                await trio.lowlevel.checkpoint()
                continue
            with trio.move_on_at(self.progress_at + self.config.write_timeout):
                await trio.lowlevel.wait_writable(fd)
                continue
            log.warning(
                "control.client_not_reading",
                unsent_bytes=self.unsent,
                write_timeout=self.config.write_timeout,
                pending=len(self.pending),
            )
            self.close()
            return

    def _write_some(self) -> int | None:
        """Write as much of what waits as the socket takes: the byte count (0: it takes
        nothing now), or None if the client is gone."""
        try:
            return os.writev(self.fd, self.out[:_MAX_IOV])
        except BlockingIOError:
            return 0
        except OSError:
            self.gone()
            return None

    def _sent(self, count: int) -> None:
        self.progress_at = trio.current_time()
        self.unsent -= count
        out = self.out
        rest = consume(out, count)
        if rest:
            out[0] = out[0][rest:]
        if not out and self.coalesced:
            # What waited is written: the progress lines held back behind it go next.
            lines = b"".join(self.coalesced.values())
            self.coalesced.clear()
            self.unsent -= len(lines)
            self.send(lines)
        if self.held and self.unsent < self.max_unsent // 2:
            self.held = False
            self.front.release(self)
            self._poke()
        if not out:
            self._poke()

    async def flush(self) -> None:
        """Write what is still owed, even while the daemon is torn down: runs after the
        writer task has ended, so it is the only sender. A client that stops reading is
        given up on after `server.write_timeout`, or `FINAL_FLUSH` seconds if shorter: a
        stopping daemon does not wait long for a client that reads nothing."""
        self.progress_at = trio.current_time()
        with trio.CancelScope(shield=True):
            while self.open and self.out:
                sent = self._write_some()
                if sent is None:
                    return
                if sent:
                    self._sent(sent)
                    continue
                wait = min(self.config.write_timeout, FINAL_FLUSH)
                with trio.move_on_at(self.progress_at + wait) as waiting:
                    await trio.lowlevel.wait_writable(self.fd)
                if waiting.cancelled_caught:
                    self.gone()

    async def flushed(self) -> None:
        """Return once every queued answer has been written (or the client is gone)."""
        while self.open and self.out:
            await self._wait_change()

    def _poke(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    async def _wait_change(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    # -- ending --------------------------------------------------------------------------

    def gone(self) -> None:
        """The client is gone: its queued actions are cancelled; running ones finish unseen."""
        if self.open:
            self.open = False
            self.out.clear()
            self.unsent = 0
            self.watching.clear()
            self.coalesced.clear()
            if self.pending:
                self.front.withdraw(self)
                self.pending.clear()
            self.held = False
            self._poke()

    def close(self) -> None:
        """Give up on the client now: forget it and end its tasks."""
        self.gone()
        if self._scope is not None:
            self._scope.cancel()

    def fatal(self, code: str, message: str) -> None:
        """A line we cannot answer by id: one error line; the connection then closes."""
        self.send(error_line(b"null", {"code": code, "message": message}))

    # -- reading -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Read and answer requests until the client is done, gone or given up on."""
        async with trio.open_nursery() as tasks:
            self._scope = tasks.cancel_scope
            tasks.start_soon(self._write)
            await self._read()
            if self.open:
                await self.flushed()
            tasks.cancel_scope.cancel()

    async def _read(self) -> None:
        fd = self.fd
        lines = _Lines(self.config.max_message_bytes)
        # After answering, poll for the client's next request for `pool.idle_spin` before
        # sleeping in epoll: a client sending one request at a time has it here within
        # tens of microseconds, and waking a sleeping daemon costs about as much again.
        spin_until = 0.0
        while self.open:
            if self.unsent >= self.max_unsent:
                # The client is not reading its answers: read no more requests until it does.
                await self._wait_change()
                continue
            # A plain read on the non-blocking socket first, epoll only when it is empty: a
            # trio socket's recv, and a cancel scope per read, cost more than the request.
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                if lines.partial_since is None:
                    spin_until = await self._idle(spin_until)
                elif not await self._rest_of_line(lines.partial_since):
                    return
                continue
            except OSError:  # reset by the peer, say: it is gone
                self.gone()
                return
            if not data:
                if lines.partial_since is not None:
                    self.fatal("bad_request", "the connection ended inside a request line")
                    return
                await self._ended()
                return
            chunk = lines.feed(data, trio.current_time())
            if chunk and not await self._requests(chunk, lines.limit):
                return
            if lines.too_long():
                self.fatal("too_large", f"a request line is over {lines.limit} bytes")
                return
            if chunk and self.spin:
                spin_until = time.perf_counter() + self.spin
            if len(data) >= _BUSY_READ:
                # Requests are streaming in: let everyone else run before reading on.
                await trio.lowlevel.checkpoint()

    async def _idle(self, spin_until: float) -> float:
        """Nothing to read, no line begun: poll until `spin_until` (giving this CPU to the
        client, if it waits for one), then wait in epoll. The polling time left."""
        if spin_until and time.perf_counter() < spin_until:
            os.sched_yield()
            await trio.lowlevel.checkpoint()
            return spin_until
        await trio.lowlevel.wait_readable(self.fd)
        return 0.0

    async def _rest_of_line(self, since: float) -> bool:
        """Wait for the rest of a line begun at `since`, within `server.read_timeout`;
        False (and the fatal line sent) once the time is up."""
        timeout = self.config.read_timeout
        with trio.move_on_at(since + timeout):
            await trio.lowlevel.wait_readable(self.fd)
            return True
        self.fatal(
            "read_timeout",
            f"a request line was not finished within {timeout:g} s (server.read_timeout)",
        )
        return False

    async def _requests(self, chunk: bytes, limit: int) -> bool:
        """Handle every complete line in `chunk`; False if the connection must close."""
        try:
            requests = _decode_requests(chunk)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            requests = None
        if requests is not None and len(chunk) <= limit:
            if len(requests) == 1 and requests[0].op == "submit":
                await self.front.submit_direct(self, requests[0])
                return True
            if self.unsent < self.max_unsent and self.front.submit_all(self, requests):
                return True  # all plain submits, as a pipelining client sends: in one go
            handle = self.front.handle
            for request in requests:
                if self.unsent >= self.max_unsent:
                    await self._room()
                    if not self.open:
                        return False
                handle(self, request)
            return True
        # Something in the chunk is wrong: go line by line to answer each as it deserves.
        for line in chunk.split(b"\n")[:-1]:
            if not line.strip():
                continue
            if len(line) > limit:
                self.fatal("too_large", f"a request line is over {limit} bytes")
                return False
            await self._room()
            if not self.open:
                return False
            try:
                request = _decode_request(line)
            except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
                if not self._bad_line(line):
                    return False
                continue
            self.front.handle(self, request)
        return True

    async def _room(self) -> None:
        """Wait while the client has `max_unsent_bytes` of answers unread: requests already
        read (a status costs more to answer than to ask) wait their turn."""
        while self.open and self.unsent >= self.max_unsent:
            await self._wait_change()

    def _bad_line(self, line: bytes) -> bool:
        """Answer a line that is not a valid request; False if the connection must end."""
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fatal("bad_request", f"not JSON: not UTF-8 text (byte {exc.start})")
            return False
        try:
            _decode_raw(line)
        except msgspec.DecodeError as exc:
            self.fatal("bad_request", f"not JSON: {exc}")
            return False
        except RecursionError:
            if not _balanced(line):
                self.fatal("bad_request", "not JSON: its brackets do not balance")
                return False
            # JSON, perhaps, but nested deeper than anyone needs: refuse the line.
            self.send(error_line(b"null", {"code": "bad_request", "message": _TOO_DEEP}))
            return True
        id_json = _id_of(line)
        try:
            value = _decode_any(line)
        except msgspec.DecodeError as exc:
            # JSON, but not JSON a worker could hold (a number out of range, say).
            reason = f"the request holds a value that cannot be used: {exc}"
            self.send(error_line(id_json, {"code": "bad_request", "message": reason}))
            return True
        if not isinstance(value, dict):
            reason = "a request is a JSON object"
        else:
            try:
                _decode_request(line)
            except msgspec.ValidationError as exc:
                reason = str(exc).replace("$.", "")
            else:  # pragma: no cover - it decoded alone after all
                reason = "malformed request"
        self.send(error_line(id_json, {"code": "bad_request", "message": reason}))
        return True

    async def _ended(self) -> None:
        # End of file: either the client closed its socket (it is gone: cancel its queued
        # work) or it only shut down its sending side and still reads: answer everything,
        # then close, so that it sees end-of-file as soon as it has every answer.
        poller = select.poll()
        poller.register(self.fd, select.POLLHUP)
        if any(event & select.POLLHUP for _, event in poller.poll(0)):
            self.gone()
            return
        while self.open and (self.pending or self.out):
            await self._wait_change()


class _Lines:
    """Request lines out of a byte stream, a chunk of complete ones at a time (sans-IO)."""

    __slots__ = ("_buf", "_scanned", "limit", "partial_since")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0  # no newline in _buf[:_scanned]
        #: When the line now partial began (None: no line begun).
        self.partial_since: float | None = None

    def feed(self, data: bytes, now: float) -> bytes:
        """The complete lines `data` makes, as one chunk (b"" if none); the rest is kept."""
        buf = self._buf
        buf += data
        end = buf.rfind(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(buf)
            if self.partial_since is None:
                self.partial_since = now
            return b""
        chunk = bytes(buf[: end + 1])
        del buf[: end + 1]
        self._scanned = 0
        self.partial_since = now if buf else None
        return chunk

    def too_long(self) -> bool:
        """Whether the line begun is longer than a line may be already."""
        return len(self._buf) > self.limit


def _id_of(line: bytes) -> bytes:
    """The JSON text of a usable id in `line` (a JSON object), else `null`."""
    try:
        raw = bytes(_decode_id(line).id)
        given = _decode_any(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return b"null"
    if isinstance(given, int | str) and not isinstance(given, bool):
        return _encode(given)
    return b"null"


def _balanced(line: bytes) -> bool:
    """Whether the brackets of `line` balance outside its strings (a cheap, loop-free look
    at a line too deep for the decoder: JSON nests; a run of `[` does not)."""
    bare = _STRINGS.sub(b"", line)
    return bare.count(b"[") == bare.count(b"]") and bare.count(b"{") == bare.count(b"}")
