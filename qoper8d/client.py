"""Clients of the control socket: `Client` (blocking) and `open_client` (async, anyio).

Both speak docs/protocol.md and nothing else, so they show what any client has to do:

- Requests carry ids from a counter; responses come in any order and are matched by id.
  Many requests share one connection, so `map` pipelines: it keeps up to `window` submits
  in flight, writes the ones it has queued in one go, and yields results in input order;
  its `on_wait` hook runs whenever the next result is not in yet (`qoper8ctl submit`
  flushes its output and redraws its progress bar there).
- An error response becomes the `qoper8d` exception for its code (`error_from_wire`), so
  a caller catches `qoper8d.WorkerLost` exactly as an in-process caller of the pool does.
- Failing to reach the daemon is a `ConnectError`: `NotRunning` (no socket, nothing
  listening, or the daemon hung up mid-request), `AccessDenied` (EACCES/EPERM) or
  `ConnectTimeout`. The daemon's own `forbidden` refusal stays `Forbidden`: it is the
  daemon's answer, and it arrives as data like every other error.
- `timeout` bounds connecting and every request the daemon answers by itself (`hello`,
  `status`, `cancel`, `scale`, `shutdown`). Requests that wait for actions — `submit`,
  `map`, `reload` (it replaces workers after their current action) and `drain` — wait as
  long as the actions take; bound an action with `submit(..., timeout=seconds)` instead.
- Leaving a `map` early (break, an exception, an error outcome raised at its position)
  sends a `cancel` for every submit still outstanding: queued ones are dropped and running
  ones are stopped, so nothing the caller walked away from keeps a worker busy (a hung
  action included) and the connection stays usable by everything else sharing it.
- Likewise a `submit` interrupted (Ctrl-C) or, in the async client, cancelled sends a
  `cancel` for its action. Closing a client (leaving `open_client`'s block, even a
  cancelled one) sends such cancels first and ends the connection cleanly: it shuts down
  its sending side and reads until the daemon, having answered, hangs up (for at most
  `CLOSE_GRACE` seconds, in `qoper8d._connect`).
- A connection the daemon closed is replaced by a new one on the next request, so a
  long-lived client outlives a daemon restart; requests in flight on the old one fail.

Both clients are I/O loops around one sans-IO protocol, in the manner of hypercorn's
`protocol/h11.py` and its trio and asyncio servers: `qoper8d._protocol` holds a
connection's state (ids, the responses waited for, the output buffer, decoding, a `map`'s
window, order and abandonment, the cancels of requests given up on), and `qoper8d._ops`
what each op sends and how its result reads. The clients differ only in how they move
bytes and wait; finding the socket and explaining a failed connect is `qoper8d._connect`.

The blocking client keeps its socket non-blocking and waits with poll(2) for readable *or*
writable, never for one alone: a client blocked writing a large batch while the daemon
blocks writing responses nobody reads would otherwise deadlock. It is not thread-safe; use
one per thread. The async client runs a reader and a writer task per connection in the
`open_client` task group; the writer sends whatever many coroutines queued in one write.
"""

from __future__ import annotations

import itertools
import math
import os
import select
import socket as socketlib
import time
from collections.abc import Callable, Generator, Iterable
from contextlib import suppress
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

from qoper8d import _connect, _ops
from qoper8d._aclient import AsyncClient, open_client
from qoper8d._connect import StrPath, resolve_socket_path
from qoper8d._protocol import ClientProtocol, MapRun, RequestId, again, closed
from qoper8d._window import window_for
from qoper8d.errors import Qoper8Error

__all__ = ["AsyncClient", "Client", "open_client", "resolve_socket_path"]

T = TypeVar("T")

#: Buffers per sendmsg(2), under Linux's IOV_MAX of 1024.
_MAX_IOV = 512


class _Connection:
    """One socket to the daemon, and its `ClientProtocol`: the poll(2) loop that moves the
    bytes between them."""

    def __init__(self, sock: socketlib.socket, protocol: ClientProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self.fd = sock.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    def pump(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        """Send and receive until `ready()`; False if `deadline` (a `time.monotonic()`
        value) passed first. Raises the connection's failure if it is lost."""
        protocol = self.protocol
        poller = self.poller
        if protocol.out:
            # The socket is almost always writable: try before asking poll(2).
            self._send()
        while not ready():
            if protocol.failure is not None:
                raise again(protocol.failure)
            if deadline is None:
                wait: float | None = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = math.ceil(left * 1000)
            poller.modify(
                self.fd, select.POLLIN | select.POLLOUT if protocol.out else select.POLLIN
            )
            for _, events in poller.poll(wait):
                if events & select.POLLOUT:
                    self._send()
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._receive()
        return True

    def flush(self, deadline: float | None) -> None:
        """Best effort: send what is queued (the cancels of abandoned submits, say) by
        `deadline`. Never raises: it runs on the way out of another exception."""
        protocol = self.protocol
        if protocol.failure is None and protocol.out:
            with suppress(Qoper8Error):
                self.pump(lambda: not protocol.out, deadline)

    def _send(self) -> None:
        protocol = self.protocol
        out = protocol.out
        first = memoryview(out[0])[protocol.sent :]
        try:
            if len(out) == 1:
                count = self.sock.send(first, socketlib.MSG_NOSIGNAL)
            else:
                count = self.sock.sendmsg([first, *out[1:_MAX_IOV]], (), socketlib.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            protocol.cannot_send()
            return
        protocol.written(count)

    def _receive(self) -> None:
        try:
            data = self.sock.recv(_connect.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.protocol.receive_data(data)
        if self.protocol.failure is not None:
            self.sock.close()

    def close(self) -> None:
        """Close cleanly, within `CLOSE_GRACE` seconds: send what is queued (cancels of
        abandoned submits, say), say we are done (SHUT_WR), read until the daemon hangs up.

        Closing a Unix socket with answers still unread in it resets the other end; the
        daemon answers the last requests and closes first, so that never happens here.
        """
        protocol = self.protocol
        if protocol.failure is None:
            deadline = time.monotonic() + _connect.CLOSE_GRACE
            with suppress(Qoper8Error, OSError):
                if self.pump(lambda: not protocol.out, deadline):
                    protocol.closing = True
                    self.sock.shutdown(socketlib.SHUT_WR)
                    self.pump(lambda: protocol.failure is not None, deadline)
        protocol.connection_lost(closed(protocol.path))
        self.sock.close()


class Client:
    """A blocking client of a running qoper8d.

    `socket` names the control socket; without it, `config`'s `server.socket`, else the
    default path. Connecting happens here, so a missing daemon raises at once. The client
    is a context manager; `close()` ends the connection. See the module docstring for what
    `timeout` bounds.
    """

    def __init__(
        self,
        socket: StrPath | None = None,
        *,
        config: StrPath | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        self.path = resolve_socket_path(socket, config)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._closed = False
        self._conn: _Connection | None = self._connect()

    def _connect(self) -> _Connection:
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(os.fspath(self.path))
        except OSError as exc:
            sock.close()
            raise _connect.connect_error(exc, self.path, self.timeout) from None
        sock.setblocking(False)
        return _Connection(sock, ClientProtocol(self.path, self._ids))

    def _connection(self) -> _Connection:
        if self._closed:
            raise closed(self.path)
        conn = self._conn
        if conn is None or conn.protocol.failure is not None:
            conn = self._conn = self._connect()
        return conn

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _call(
        self, request: _ops.Request[T], on_progress: Callable[[Any], object] | None = None
    ) -> T:
        op, body = request
        conn = self._connection()
        protocol = conn.protocol
        rid = protocol.send(body)
        try:
            if on_progress is None:
                ready = partial(protocol.responses.__contains__, rid)
                if not conn.pump(ready, self._deadline() if op.bounded else None):
                    raise _connect.timed_out(self.path, self.timeout)
            else:
                self._watch(conn, rid, on_progress)
        except BaseException:
            # Timed out, lost, or interrupted (Ctrl-C): an interrupted submit is cancelled,
            # as a cancelled one is in the async client.
            if protocol.give_up((rid,), cancel=op.cancels):
                conn.flush(self._deadline())
            raise
        return protocol.outcome(rid, op)

    def _watch(self, conn: _Connection, rid: int, on_progress: Callable[[Any], object]) -> None:
        """Pump until the response to `rid` is in, calling `on_progress` for each progress
        value on the way (the latest one read, each time the caller gets to it)."""
        protocol = conn.protocol
        reports = protocol.reports
        protocol.watched.add(rid)
        try:
            while True:
                conn.pump(lambda: rid in protocol.responses or rid in reports, None)
                if rid not in reports:
                    return
                on_progress(reports.pop(rid))
        finally:
            protocol.watched.discard(rid)
            reports.pop(rid, None)

    # -- operations --------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """The daemon's protocol and version, its pid, its ops and its line limit."""
        return self._call(_ops.hello())

    def submit(
        self,
        action: Any,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        on_progress: Callable[[Any], object] | None = None,
    ) -> Any:
        """Run one action and return its result, or raise its error outcome.

        `timeout` limits how long it may *run* (0: no limit; default `pool.action_timeout`);
        `max_attempts` overrides `pool.max_attempts` for it. `on_progress(value)` is called
        here for what its handler reports with `qoper8d.progress()` (best-effort,
        coalesced: the latest wins; the last one before the result).
        """
        if on_progress is None:
            return self._call(_ops.submit(action, timeout, max_attempts))
        return self._call(_ops.submit(action, timeout, max_attempts, True), on_progress)

    def map(
        self,
        actions: Iterable[Any],
        *,
        window: int | None = None,
        return_exceptions: bool = False,
        timeout: float | None = None,
        max_attempts: int | None = None,
        on_wait: Callable[[], object] | None = None,
    ) -> Generator[Any, None, None]:
        """Run `actions` (consumed lazily) and yield their results in order, pipelined.

        By default the number of submits in flight adapts to how fast answers come back
        and how big actions and results are (`qoper8d._window`: it starts at 4,096 and
        keeps between 16 and 16,384, within 4 MiB of requests and 8 MiB of results);
        `window=n` fixes it at n instead. An error outcome is raised at its
        position, or yielded in its place with `return_exceptions` (refusals such as
        `QueueFull` too); losing the daemon always raises. Leaving early cancels the rest.
        `timeout` and `max_attempts` apply to every action, as in `submit`.

        `on_wait`, if given, is called with no arguments each time the map is about to wait
        for the daemon because the next result is not in yet: the moment to flush output
        buffered from earlier results or redraw a progress report (`qoper8ctl submit` does
        both there). It is not called while results are already waiting to be yielded.
        """
        run = MapRun(window_for(window), return_exceptions, timeout, max_attempts)
        return self._map(actions, run, on_wait)

    def _map(
        self,
        actions: Iterable[Any],
        run: MapRun,
        on_wait: Callable[[], object] | None,
    ) -> Generator[Any, None, None]:
        conn = self._connection()
        run.start(conn.protocol)
        responses = conn.protocol.responses
        source = iter(actions)
        fill = run.fill
        take = run.take
        try:
            while (head := fill(source)) is not None:
                if head not in responses:
                    if on_wait is not None:
                        on_wait()
                    conn.pump(partial(responses.__contains__, head), None)
                yield take()
        finally:
            if run.abandon():
                conn.flush(self._deadline())

    def cancel(self, target_id: RequestId) -> bool:
        """Cancel an earlier submit on this connection; True if it had not ended yet."""
        return self._call(_ops.cancel(target_id))

    def status(self) -> dict[str, Any]:
        """The pool snapshot, as `qoper8ctl status --json` prints it."""
        return self._call(_ops.status())

    def scale(self, size: int) -> dict[str, Any]:
        """Change the number of workers; returns once the pool has `size` of them:
        `{"size": n}`, or `{"size": n, "superseded": True}` when a later resize overtook
        this one (n is then the size the pool had)."""
        return self._call(_ops.scale(size))

    def reload(self) -> list[str]:
        """Re-read the daemon's configuration file; the changed keys, one line each."""
        return self._call(_ops.reload())

    def drain(self) -> None:
        """Wait until every accepted action has ended; the daemon then stops."""
        self._call(_ops.drain())

    def shutdown(self, grace: float | None = None) -> None:
        """Ask the daemon to stop gracefully (running actions get `grace` seconds)."""
        self._call(_ops.shutdown(grace))

    # -- life ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; further calls raise `ConnectError`."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({os.fspath(self.path)!r})"
