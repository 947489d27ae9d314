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
  `_CLOSE_GRACE` seconds).
- A connection the daemon closed is replaced by a new one on the next request, so a
  long-lived client outlives a daemon restart; requests in flight on the old one fail.

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
from collections import deque
from collections.abc import (
    Callable,
    Generator,
    Iterable,
)
from contextlib import suppress
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from qoper8d._aclient import AsyncClient, open_client
from qoper8d._client_common import (
    _CLOSE_GRACE,
    _MAX_IOV,
    _RECV_SIZE,
    RequestId,
    StrPath,
    _again,
    _cancel_line,
    _check_window,
    _connect_error,
    _error,
    _LineDecoder,
    _outcome,
    _request_line,
    _Response,
    _submit_fields,
    _submit_line,
    _timed_out,
    resolve_socket_path,
)
from qoper8d.errors import (
    ConnectError,
    Qoper8Error,
)

__all__ = ["AsyncClient", "Client", "open_client", "resolve_socket_path"]


# -- blocking ----------------------------------------------------------------------------------


class _Connection:
    """One socket to the daemon: lines waiting to be sent, responses waiting to be claimed.

    Only responses to ids in `wanted` are kept; the rest (cancels, requests given up on)
    are dropped as they arrive.
    """

    def __init__(self, sock: socketlib.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self.fd = sock.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.out: list[bytes] = []
        self.sent = 0  # bytes of out[0] already written
        self.decoder = _LineDecoder(path)
        self.wanted: set[RequestId] = set()
        self.responses: dict[RequestId, _Response] = {}
        self.failure: Qoper8Error | None = None

    def queue(self, line: bytes, rid: RequestId | None = None) -> None:
        self.out.append(line)
        if rid is not None:
            self.wanted.add(rid)

    def pump(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        """Write queued lines and read responses until `ready()`; False if `deadline`
        (a `time.monotonic()` value) passed first. Raises if the connection is lost."""
        poller = self.poller
        if self.out:
            # The socket is almost always writable: try before asking poll(2).
            self._send()
        while not ready():
            if self.failure is not None:
                raise _again(self.failure)
            if deadline is None:
                wait: float | None = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = math.ceil(left * 1000)
            poller.modify(self.fd, select.POLLIN | select.POLLOUT if self.out else select.POLLIN)
            for _, events in poller.poll(wait):
                if events & select.POLLOUT:
                    self._send()
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._receive()
        return True

    def _send(self) -> None:
        out = self.out
        first = memoryview(out[0])[self.sent :]
        try:
            if len(out) == 1:
                count = self.sock.send(first, socketlib.MSG_NOSIGNAL)
            else:
                count = self.sock.sendmsg([first, *out[1:_MAX_IOV]], (), socketlib.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # The daemon hung up. Send nothing more, but keep reading: its last words (an
            # error line with id null, say `forbidden`) may still be waiting to be read.
            out.clear()
            self.sent = 0
            return
        count += self.sent
        done = 0
        for line in out:
            if count < len(line):
                break
            count -= len(line)
            done += 1
        del out[:done]
        self.sent = count

    def _receive(self) -> None:
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.fail(self.decoder.ended())
            return
        try:
            responses = self.decoder.feed(data)
        except ConnectError as exc:
            self.fail(exc)
            return
        wanted = self.wanted
        for response in responses:
            if response.id in wanted:
                wanted.discard(response.id)
                self.responses[response.id] = response

    def fail(self, failure: Qoper8Error) -> None:
        if self.failure is None:
            self.failure = failure
            self.sock.close()

    def close(self) -> None:
        """Close cleanly, within `_CLOSE_GRACE` seconds: send what is queued (cancels of
        abandoned submits, say), say we are done (SHUT_WR), read until the daemon hangs up.

        Closing a Unix socket with answers still unread in it resets the other end; the
        daemon answers the last requests and closes first, so that never happens here.
        """
        if self.failure is None:
            deadline = time.monotonic() + _CLOSE_GRACE
            with suppress(Qoper8Error, OSError):
                if self.pump(lambda: not self.out, deadline):
                    self.sock.shutdown(socketlib.SHUT_WR)
                    self.pump(lambda: self.failure is not None, deadline)
        self.fail(ConnectError("the client is closed", path=str(self.path)))


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
            raise _connect_error(exc, self.path, self.timeout) from None
        sock.setblocking(False)
        return _Connection(sock, self.path)

    def _connection(self) -> _Connection:
        if self._closed:
            raise ConnectError("the client is closed", path=str(self.path))
        conn = self._conn
        if conn is None or conn.failure is not None:
            conn = self._conn = self._connect()
        return conn

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _call(self, op: str, params: dict[str, Any] | None = None, *, bounded: bool = True) -> Any:
        conn = self._connection()
        rid = next(self._ids)
        conn.queue(_request_line(rid, op, params or {}), rid)
        responses = conn.responses
        if not conn.pump(lambda: rid in responses, self._deadline() if bounded else None):
            conn.wanted.discard(rid)
            raise _timed_out(self.path, self.timeout)
        return _outcome(responses.pop(rid))

    # -- operations --------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """The daemon's protocol and version, its pid, its ops and its line limit."""
        result: dict[str, Any] = self._call("hello")
        return result

    def submit(
        self, action: Any, *, timeout: float | None = None, max_attempts: int | None = None
    ) -> Any:
        """Run one action and return its result, or raise its error outcome.

        `timeout` limits how long it may *run* (0: no limit; default `pool.action_timeout`);
        `max_attempts` overrides `pool.max_attempts` for it.
        """
        conn = self._connection()
        rid = next(self._ids)
        conn.queue(_submit_line(rid, _submit_fields(timeout, max_attempts), action), rid)
        responses = conn.responses
        try:
            conn.pump(lambda: rid in responses, None)
        except BaseException:
            self._abandon(conn, [rid])  # interrupted (Ctrl-C): cancel it, as the async one does
            raise
        return _outcome(responses.pop(rid))

    def map(
        self,
        actions: Iterable[Any],
        *,
        window: int = 256,
        return_exceptions: bool = False,
        timeout: float | None = None,
        max_attempts: int | None = None,
        on_wait: Callable[[], object] | None = None,
    ) -> Generator[Any, None, None]:
        """Run `actions` (consumed lazily) and yield their results in order, pipelined.

        Up to `window` submits are in flight at once. An error outcome is raised at its
        position, or yielded in its place with `return_exceptions` (refusals such as
        `QueueFull` too); losing the daemon always raises. Leaving early cancels the rest.
        `timeout` and `max_attempts` apply to every action, as in `submit`.

        `on_wait`, if given, is called with no arguments each time the map is about to wait
        for the daemon because the next result is not in yet: the moment to flush output
        buffered from earlier results or redraw a progress report (`qoper8ctl submit` does
        both there). It is not called while results are already waiting to be yielded.
        """
        _check_window(window)
        return self._map(actions, window, return_exceptions, timeout, max_attempts, on_wait)

    def _map(
        self,
        actions: Iterable[Any],
        window: int,
        return_exceptions: bool,
        timeout: float | None,
        max_attempts: int | None,
        on_wait: Callable[[], object] | None,
    ) -> Generator[Any, None, None]:
        conn = self._connection()
        fields = _submit_fields(timeout, max_attempts)
        ids = self._ids
        responses = conn.responses
        pending: deque[int] = deque()
        source = iter(actions)
        more = True
        try:
            while True:
                while more and len(pending) < window:
                    try:
                        action = next(source)
                    except StopIteration:
                        more = False
                        break
                    rid = next(ids)
                    conn.queue(_submit_line(rid, fields, action), rid)
                    pending.append(rid)
                if not pending:
                    return
                head = pending[0]
                if head not in responses:
                    if on_wait is not None:
                        on_wait()
                    conn.pump(partial(responses.__contains__, head), None)
                response = responses.pop(pending.popleft())
                if response.ok:
                    yield response.result
                elif return_exceptions:
                    yield _error(response)
                else:
                    raise _error(response)
        finally:
            if pending:
                self._abandon(conn, pending)

    def _abandon(self, conn: _Connection, pending: Iterable[int]) -> None:
        """Cancel submits nobody waits for any more, and drop their responses."""
        for rid in pending:
            if conn.responses.pop(rid, None) is None and rid in conn.wanted:
                conn.wanted.discard(rid)
                conn.queue(_cancel_line(next(self._ids), rid))
        if conn.failure is None and conn.out:
            # Best effort: the cancels are worth sending now, but never worth an exception
            # that would hide the one that brought us here.
            with suppress(Qoper8Error):
                conn.pump(lambda: not conn.out, self._deadline())

    def cancel(self, target_id: RequestId) -> bool:
        """Cancel an earlier submit on this connection; True if it had not ended yet."""
        result: dict[str, Any] = self._call("cancel", {"target": target_id})
        return bool(result.get("cancelled"))

    def status(self) -> dict[str, Any]:
        """The pool snapshot, as `qoper8ctl status --json` prints it."""
        result: dict[str, Any] = self._call("status")
        return result

    def scale(self, size: int) -> dict[str, Any]:
        """Change the number of workers; returns once the pool has `size` of them:
        `{"size": n}`, or `{"size": n, "superseded": True}` when a later resize overtook
        this one (n is then the size the pool had)."""
        result: dict[str, Any] = self._call("scale", {"size": size})
        return result

    def reload(self) -> list[str]:
        """Re-read the daemon's configuration file; the changed keys, one line each."""
        result: dict[str, Any] = self._call("reload", bounded=False)
        return [str(line) for line in result.get("changed", [])]

    def drain(self) -> None:
        """Wait until every accepted action has ended; the daemon then stops."""
        self._call("drain", bounded=False)

    def shutdown(self, grace: float | None = None) -> None:
        """Ask the daemon to stop gracefully (running actions get `grace` seconds)."""
        self._call("shutdown", {} if grace is None else {"grace": float(grace)})

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
