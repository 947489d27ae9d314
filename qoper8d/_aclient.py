"""The async client: `open_client()` and `AsyncClient`, on anyio (trio or asyncio).

See `qoper8d.client` for how the clients behave. This is the anyio loop around
`qoper8d._protocol`: a reader and a writer task per connection, and tasks waiting on
events for the ids they want.
"""

from __future__ import annotations

import inspect
import itertools
import os
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
from typing import Any, TypeVar

import anyio
import anyio.abc

from qoper8d import _connect, _ops
from qoper8d._connect import StrPath, resolve_socket_path
from qoper8d._protocol import ClientProtocol, MapRun, RequestId, again, closed
from qoper8d._window import OUT_BYTES, window_for
from qoper8d.errors import Qoper8Error

__all__ = ["AsyncClient", "open_client"]

T = TypeVar("T")


class _AsyncConnection:
    """One stream to the daemon and its `ClientProtocol`, served by a reader and a writer.

    Both run shielded, in `scope`, and stop only when `close()` says so: when the caller's
    block is cancelled, the cancels its abandoned submits just queued must still be sent.
    """

    def __init__(self, stream: anyio.abc.SocketStream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.wakers: dict[RequestId, anyio.Event] = {}  # the ids tasks are waiting for now
        self.wake = anyio.Event()  # the writer's: there is something to send
        self.scope = anyio.CancelScope(shield=True)
        self.written = anyio.Event()  # the writer is done: all sent, or the daemon gone
        self.read = anyio.Event()  # the reader is done: the daemon hung up

    def flush(self) -> None:
        """Have the writer send whatever the protocol queued (it takes all of it at once)."""
        if self.protocol.out:
            self.wake.set()

    async def wait(self, rid: RequestId) -> None:
        """Until the response to `rid` (or a progress value for it) is in; raises the
        connection's failure if it ends first."""
        protocol = self.protocol
        while rid not in protocol.responses and rid not in protocol.reports:
            if protocol.failure is not None:
                raise again(protocol.failure)
            event = self.wakers[rid] = anyio.Event()
            try:
                await event.wait()
            finally:
                self.wakers.pop(rid, None)

    def lost(self, failure: Qoper8Error) -> None:
        self.protocol.connection_lost(failure)
        wakers, self.wakers = self.wakers, {}
        for event in wakers.values():
            event.set()

    async def serve(self) -> None:
        try:
            with self.scope:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._write)
                    await self._read()
                    tasks.cancel_scope.cancel()
        finally:
            self.lost(closed(self.protocol.path))
            await anyio.aclose_forcefully(self.stream)

    async def close(self) -> None:
        """Close cleanly, as `Client.close` does, then stop both tasks."""
        if self.protocol.failure is None:
            self.protocol.closing = True
            self.wake.set()
            with anyio.move_on_after(_connect.CLOSE_GRACE):
                await self.written.wait()
                with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await self.stream.send_eof()
                await self.read.wait()
        self.scope.cancel()

    async def _write(self) -> None:
        protocol = self.protocol
        try:
            while protocol.out or not protocol.closing:
                if not protocol.out:
                    await self.wake.wait()
                    self.wake = anyio.Event()
                    continue
                await self.stream.send(protocol.data_to_send())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            # The daemon hung up; the reader reads its last words and fails the waiters.
            protocol.cannot_send()
        finally:
            self.written.set()

    async def _read(self) -> None:
        protocol = self.protocol
        while True:
            try:
                data = await self.stream.receive(_connect.RECV_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            responses = protocol.receive_data(data)
            if protocol.failure is not None:
                self.lost(protocol.failure)
                self.read.set()
                return
            wakers = self.wakers
            if wakers:
                for response in responses:
                    event = wakers.pop(response.id, None)  # type: ignore[arg-type]
                    if event is not None:
                        event.set()


async def _connect_stream(path: Path, timeout: float | None) -> anyio.abc.SocketStream:
    try:
        with anyio.fail_after(timeout):
            return await anyio.connect_unix(path)
    except OSError as exc:  # TimeoutError included
        raise _connect.connect_error(exc, path, timeout) from None


async def _fill(run: MapRun, source: AsyncIterator[Any], conn: _AsyncConnection) -> int | None:
    """`run.fill` from an async source: each submit goes out as soon as its action comes."""
    room = run.room()
    # Big actions: the window's bytes, before it has learnt their size (as `run.fill`).
    stop_at = run.observed.sent_bytes + OUT_BYTES
    while room > 0 and run.observed.sent_bytes < stop_at:
        try:
            action = await anext(source)
        except StopAsyncIteration:
            run.exhausted()
            break
        run.submit(action)
        conn.flush()
        room -= 1
    return run.head()


class AsyncClient:
    """The async client, from `open_client`: the methods of `Client` as coroutines, and
    `map` as an async iterator. Any number of tasks may share one; cancelling a task
    waiting in `submit` cancels its action in the daemon too."""

    def __init__(
        self,
        path: Path,
        timeout: float | None,
        tasks: anyio.abc.TaskGroup,
        stream: anyio.abc.SocketStream,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._tasks = tasks
        self._ids = itertools.count(1)
        self._conn = self._serve(stream)
        self._connecting = anyio.Lock()
        self._closed = False

    def _serve(self, stream: anyio.abc.SocketStream) -> _AsyncConnection:
        conn = _AsyncConnection(stream, ClientProtocol(self.path, self._ids))
        self._tasks.start_soon(conn.serve)
        return conn

    async def _connection(self) -> _AsyncConnection:
        if self._conn.protocol.failure is None:
            return self._conn
        async with self._connecting:
            if self._closed:
                raise closed(self.path)
            if self._conn.protocol.failure is not None:
                self._conn = self._serve(await _connect_stream(self.path, self.timeout))
            return self._conn

    async def _call(
        self, request: _ops.Request[T], on_progress: Callable[[Any], Any] | None = None
    ) -> T:
        op, body = request
        conn = await self._connection()
        protocol = conn.protocol
        rid = protocol.send(body)
        conn.flush()
        timeout = self.timeout if op.bounded else None
        answered = False
        try:
            with anyio.fail_after(timeout):
                if on_progress is None:
                    await conn.wait(rid)
                else:
                    await _watch(conn, rid, on_progress)
            answered = True
        except TimeoutError:
            raise _connect.timed_out(self.path, timeout) from None
        finally:
            # Timed out, lost, or cancelled: a cancelled submit cancels its action.
            if not answered and protocol.give_up((rid,), cancel=op.cancels):
                conn.flush()
        return protocol.outcome(rid, op)

    async def hello(self) -> dict[str, Any]:
        """See `Client.hello`."""
        return await self._call(_ops.hello())

    async def submit(
        self,
        action: Any,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        on_progress: Callable[[Any], Any] | None = None,
    ) -> Any:
        """See `Client.submit` (`on_progress` may be async here). Cancelling the caller
        cancels the action."""
        if on_progress is None:
            return await self._call(_ops.submit(action, timeout, max_attempts))
        return await self._call(_ops.submit(action, timeout, max_attempts, True), on_progress)

    def map(
        self,
        actions: Iterable[Any] | AsyncIterable[Any],
        *,
        window: int | None = None,
        return_exceptions: bool = False,
        timeout: float | None = None,
        max_attempts: int | None = None,
        on_wait: Callable[[], object] | None = None,
    ) -> AsyncGenerator[Any, None]:
        """See `Client.map`; `actions` may be an async iterable too, and `on_wait` is called
        (a plain function, not awaited) each time the next result is not in yet."""
        run = MapRun(window_for(window), return_exceptions, timeout, max_attempts)
        return self._map(actions, run, on_wait)

    async def _map(
        self,
        actions: Iterable[Any] | AsyncIterable[Any],
        run: MapRun,
        on_wait: Callable[[], object] | None,
    ) -> AsyncGenerator[Any, None]:
        conn = await self._connection()
        run.start(conn.protocol)
        responses = conn.protocol.responses
        if isinstance(actions, AsyncIterable):
            asource: AsyncIterator[Any] | None = aiter(actions)
            source: Iterator[Any] = iter(())
        else:
            asource = None
            source = iter(actions)
        try:
            while True:
                head = run.fill(source) if asource is None else await _fill(run, asource, conn)
                if head is None:
                    return
                conn.flush()
                if head not in responses:
                    if on_wait is not None:
                        on_wait()
                    await conn.wait(head)
                yield run.take()
        finally:
            # No awaits here: this may run as the generator is collected, outside any task.
            if run.abandon():
                conn.flush()

    async def cancel(self, target_id: RequestId) -> bool:
        """See `Client.cancel`."""
        return await self._call(_ops.cancel(target_id))

    async def status(self) -> dict[str, Any]:
        """See `Client.status`."""
        return await self._call(_ops.status())

    async def scale(self, size: int) -> dict[str, Any]:
        """See `Client.scale`."""
        return await self._call(_ops.scale(size))

    async def reload(self) -> list[str]:
        """See `Client.reload`."""
        return await self._call(_ops.reload())

    async def drain(self) -> None:
        """See `Client.drain`."""
        await self._call(_ops.drain())

    async def shutdown(self, grace: float | None = None) -> None:
        """See `Client.shutdown`."""
        await self._call(_ops.shutdown(grace))

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
    stream = await _connect_stream(path, timeout)
    error: Exception | None = None
    async with anyio.create_task_group() as tasks:
        client = AsyncClient(path, timeout, tasks, stream)
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


async def _watch(conn: _AsyncConnection, rid: RequestId, on_progress: Callable[[Any], Any]) -> None:
    """Until the response to `rid` is in, calling `on_progress` for each progress value
    on the way (the latest one read, each time the caller gets to it)."""
    protocol = conn.protocol
    reports = protocol.reports
    protocol.watched.add(rid)
    try:
        while True:
            await conn.wait(rid)
            if rid not in reports:
                return
            reported = on_progress(reports.pop(rid))
            if inspect.isawaitable(reported):
                await reported
    finally:
        protocol.watched.discard(rid)
        reports.pop(rid, None)
