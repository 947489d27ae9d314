"""The async client: `open_client()` and `AsyncClient`, on anyio (trio or asyncio).

See `qoper8d.client` for how the clients behave.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from qoper8d._client_common import (
    _CLOSE_GRACE,
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

__all__ = ["AsyncClient", "open_client"]


# -- async -------------------------------------------------------------------------------------


class _Waiter(Protocol):
    def deliver(self, response: _Response) -> None: ...

    def fail(self) -> None: ...


class _Slot:
    """Where one request's response lands."""

    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.response: _Response | None = None

    def deliver(self, response: _Response) -> None:
        self.response = response
        self.event.set()

    def fail(self) -> None:
        self.event.set()


class _Collector:
    """Where one `map`'s responses land; its task is woken only for the one it waits for."""

    def __init__(self) -> None:
        self.responses: dict[RequestId, _Response] = {}
        self.head: RequestId | None = None
        self.event: anyio.Event | None = None

    def deliver(self, response: _Response) -> None:
        self.responses[response.id] = response  # type: ignore[index]  # never None here
        if response.id == self.head and self.event is not None:
            self.event.set()

    def fail(self) -> None:
        if self.event is not None:
            self.event.set()


class _AsyncConnection:
    """One stream to the daemon, served by a reader and a writer task.

    Both run shielded, in `scope`, and stop only when `close()` says so: when the caller's
    block is cancelled, the cancels its abandoned submits just queued must still be sent.
    """

    def __init__(self, stream: anyio.abc.SocketStream, path: Path) -> None:
        self.stream = stream
        self.path = path
        self.waiters: dict[RequestId, _Waiter] = {}
        self.out: list[bytes] = []
        self.wake = anyio.Event()
        self.failure: Qoper8Error | None = None
        self.scope = anyio.CancelScope(shield=True)
        self.closing = False
        self.written = anyio.Event()  # the writer is done: all sent, or the daemon gone
        self.read = anyio.Event()  # the reader is done: the daemon hung up

    def queue(self, line: bytes, rid: RequestId, waiter: _Waiter) -> None:
        """Queue a request whose response goes to `waiter`."""
        if self.failure is not None:
            raise _again(self.failure)
        self.waiters[rid] = waiter
        self.queue_nowait(line)

    def queue_nowait(self, line: bytes) -> None:
        """Queue a line nobody waits on (a cancel), unless the connection is gone already."""
        if self.failure is None:
            self.out.append(line)
            if len(self.out) == 1:  # the writer takes the whole list each time it wakes
                self.wake.set()

    def fail(self, failure: Qoper8Error) -> None:
        if self.failure is None:
            self.failure = failure
            waiters, self.waiters = self.waiters, {}
            for waiter in {id(w): w for w in waiters.values()}.values():
                waiter.fail()

    async def serve(self) -> None:
        try:
            with self.scope:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._write)
                    await self._read()
                    tasks.cancel_scope.cancel()
        finally:
            self.fail(ConnectError("the client is closed", path=str(self.path)))
            await anyio.aclose_forcefully(self.stream)

    async def close(self) -> None:
        """Close cleanly, as `_Connection.close` does, then stop both tasks."""
        if self.failure is None:
            self.closing = True
            self.wake.set()
            with anyio.move_on_after(_CLOSE_GRACE):
                await self.written.wait()
                with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await self.stream.send_eof()
                await self.read.wait()
        self.scope.cancel()

    async def _write(self) -> None:
        try:
            while self.out or not self.closing:
                if not self.out:
                    await self.wake.wait()
                    self.wake = anyio.Event()
                    continue
                data = b"".join(self.out)
                self.out.clear()
                await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            # The daemon hung up; the reader reads its last words and fails the waiters.
            pass
        finally:
            self.written.set()

    async def _read(self) -> None:
        decoder = _LineDecoder(self.path)
        while True:
            try:
                data = await self.stream.receive(_RECV_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            if not data:
                closed = ConnectError("the client is closed", path=str(self.path))
                self.fail(closed if self.closing else decoder.ended())
                self.read.set()
                return
            try:
                responses = decoder.feed(data)
            except ConnectError as exc:
                self.fail(exc)
                return
            waiters = self.waiters
            for response in responses:
                waiter = waiters.pop(response.id, None)  # type: ignore[arg-type]
                if waiter is not None:
                    waiter.deliver(response)


async def _connect_stream(path: Path, timeout: float | None) -> anyio.abc.SocketStream:
    try:
        with anyio.fail_after(timeout):
            return await anyio.connect_unix(path)
    except OSError as exc:  # TimeoutError included
        raise _connect_error(exc, path, timeout) from None


class AsyncClient:
    """The async client, from `open_client`: the methods of `Client` as coroutines, and
    `map` as an async iterator. Any number of tasks may share one; cancelling a task
    waiting in `submit` cancels its action in the daemon too."""

    def __init__(
        self, path: Path, timeout: float | None, tasks: anyio.abc.TaskGroup, conn: _AsyncConnection
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._tasks = tasks
        self._ids = itertools.count(1)
        self._conn = conn
        self._connecting = anyio.Lock()
        self._closed = False

    async def _connection(self) -> _AsyncConnection:
        conn = self._conn
        if conn.failure is None:
            return conn
        async with self._connecting:
            if self._closed:
                raise ConnectError("the client is closed", path=str(self.path))
            if self._conn.failure is not None:
                stream = await _connect_stream(self.path, self.timeout)
                self._conn = _AsyncConnection(stream, self.path)
                self._tasks.start_soon(self._conn.serve)
            return self._conn

    async def _call(
        self, op: str, params: dict[str, Any] | None = None, *, bounded: bool = True
    ) -> Any:
        conn = await self._connection()
        rid = next(self._ids)
        slot = _Slot()
        conn.queue(_request_line(rid, op, params or {}), rid, slot)
        return await self._wait(conn, rid, slot, self.timeout if bounded else None, False)

    async def _wait(
        self,
        conn: _AsyncConnection,
        rid: int,
        slot: _Slot,
        timeout: float | None,
        cancel_on_exit: bool,
    ) -> Any:
        answered = False
        try:
            with anyio.fail_after(timeout):
                await slot.event.wait()
            answered = True
        except TimeoutError:
            raise _timed_out(self.path, timeout) from None
        finally:
            if not answered and conn.waiters.pop(rid, None) is not None and cancel_on_exit:
                conn.queue_nowait(_cancel_line(next(self._ids), rid))
        if slot.response is None:
            assert conn.failure is not None
            raise _again(conn.failure)
        return _outcome(slot.response)

    async def hello(self) -> dict[str, Any]:
        """See `Client.hello`."""
        result: dict[str, Any] = await self._call("hello")
        return result

    async def submit(
        self, action: Any, *, timeout: float | None = None, max_attempts: int | None = None
    ) -> Any:
        """See `Client.submit`. Cancelling the caller cancels the action."""
        conn = await self._connection()
        rid = next(self._ids)
        slot = _Slot()
        conn.queue(_submit_line(rid, _submit_fields(timeout, max_attempts), action), rid, slot)
        return await self._wait(conn, rid, slot, None, True)

    def map(
        self,
        actions: Iterable[Any] | AsyncIterable[Any],
        *,
        window: int = 256,
        return_exceptions: bool = False,
        timeout: float | None = None,
        max_attempts: int | None = None,
        on_wait: Callable[[], object] | None = None,
    ) -> AsyncGenerator[Any, None]:
        """See `Client.map`; `actions` may be an async iterable too, and `on_wait` is called
        (a plain function, not awaited) each time the next result is not in yet."""
        _check_window(window)
        return self._map(actions, window, return_exceptions, timeout, max_attempts, on_wait)

    async def _map(
        self,
        actions: Iterable[Any] | AsyncIterable[Any],
        window: int,
        return_exceptions: bool,
        timeout: float | None,
        max_attempts: int | None,
        on_wait: Callable[[], object] | None,
    ) -> AsyncGenerator[Any, None]:
        conn = await self._connection()
        fields = _submit_fields(timeout, max_attempts)
        ids = self._ids
        collector = _Collector()
        responses = collector.responses
        pending: deque[int] = deque()
        if isinstance(actions, AsyncIterable):
            asource: AsyncIterator[Any] | None = aiter(actions)
            source: Iterator[Any] = iter(())
        else:
            asource = None
            source = iter(actions)
        more = True
        try:
            while True:
                while more and len(pending) < window:
                    try:
                        action = await anext(asource) if asource is not None else next(source)
                    except (StopIteration, StopAsyncIteration):
                        more = False
                        break
                    rid = next(ids)
                    conn.queue(_submit_line(rid, fields, action), rid, collector)
                    pending.append(rid)
                if not pending:
                    return
                head = collector.head = pending[0]
                if head not in responses and on_wait is not None:
                    on_wait()
                while head not in responses:
                    if conn.failure is not None:
                        raise _again(conn.failure)
                    collector.event = anyio.Event()
                    await collector.event.wait()
                collector.event = None
                response = responses.pop(pending.popleft())
                if response.ok:
                    yield response.result
                elif return_exceptions:
                    yield _error(response)
                else:
                    raise _error(response)
        finally:
            # No awaits here: this may run as the generator is collected, outside any task.
            for rid in pending:
                if responses.pop(rid, None) is None and conn.waiters.pop(rid, None) is not None:
                    conn.queue_nowait(_cancel_line(next(ids), rid))

    async def cancel(self, target_id: RequestId) -> bool:
        """See `Client.cancel`."""
        result: dict[str, Any] = await self._call("cancel", {"target": target_id})
        return bool(result.get("cancelled"))

    async def status(self) -> dict[str, Any]:
        """See `Client.status`."""
        result: dict[str, Any] = await self._call("status")
        return result

    async def scale(self, size: int) -> dict[str, Any]:
        """See `Client.scale`."""
        result: dict[str, Any] = await self._call("scale", {"size": size})
        return result

    async def reload(self) -> list[str]:
        """See `Client.reload`."""
        result: dict[str, Any] = await self._call("reload", bounded=False)
        return [str(line) for line in result.get("changed", [])]

    async def drain(self) -> None:
        """See `Client.drain`."""
        await self._call("drain", bounded=False)

    async def shutdown(self, grace: float | None = None) -> None:
        """See `Client.shutdown`."""
        await self._call("shutdown", {} if grace is None else {"grace": float(grace)})

    def __repr__(self) -> str:
        return f"AsyncClient({os.fspath(self.path)!r})"


@asynccontextmanager
async def open_client(
    socket: StrPath | None = None,
    *,
    config: StrPath | None = None,
    timeout: float | None = 30.0,
) -> AsyncIterator[AsyncClient]:
    """Connect to a running qoper8d for the block (under trio or asyncio, via anyio).

    Socket discovery, errors and `timeout` are as for `Client`. Leaving the block closes
    the connection; requests still waiting in other tasks then raise `ConnectError`.
    """
    path = resolve_socket_path(socket, config)
    conn = _AsyncConnection(await _connect_stream(path, timeout), path)
    error: Exception | None = None
    async with anyio.create_task_group() as tasks:
        client = AsyncClient(path, timeout, tasks, conn)
        tasks.start_soon(conn.serve)
        try:
            yield client
        except Exception as exc:
            # Re-raised below, outside the task group, so the caller gets its own exception
            # back as it was and not wrapped in an ExceptionGroup.
            error = exc
        finally:
            client._closed = True
            with anyio.CancelScope(shield=True):
                await client._conn.close()
            tasks.cancel_scope.cancel()
    if error is not None:
        raise error
