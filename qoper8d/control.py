"""The control socket: NDJSON requests in, responses out, as docs/protocol.md describes.

`serve_control` binds the socket only when it is called — after the pool's workers are ready —
and reports `task_status.started(server)` once it listens. It runs until cancelled. The socket
file itself (a private directory, a lock, reclaiming, re-binding) is `_socketfile`'s job;
every peer's uid is checked here (SO_PEERCRED) before it may send anything.

A connection is a reader, a writer and the requests in between. `submit` payloads are passed
to the pool as raw JSON and results come back as raw JSON, spliced into response lines
without being decoded. A malformed line gets one error line and closes that connection only;
nothing a client sends can reach the daemon or another connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog
import trio

from qoper8d import __version__
from qoper8d._fds import SPARE, connection_room, short_of_fds
from qoper8d._jobs import Job
from qoper8d._socketfile import SocketInUse, bind, group_id, lock, removed, secure_directory, watch
from qoper8d.config import ServerConfig
from qoper8d.errors import (
    ActionError,
    BadRequest,
    Qoper8Error,
    RequestError,
    UnknownOp,
)
from qoper8d.pool import Pool

__all__ = ["PROTOCOL", "ControlHooks", "ControlServer", "SocketInUse", "serve_control"]

log = structlog.get_logger("qoper8d.control")

PROTOCOL = 1
OPS = ("hello", "submit", "cancel", "status", "scale", "reload", "drain", "shutdown")
_TOO_DEEP = "the request is nested too deeply"
#: A read at least this long means requests are streaming in (see `_read`).
_BUSY_READ = 4096
#: accept() errors that mean "not now", not "never": wait a little and accept again.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: Seconds a send may take before the client is taken for gone (it stopped reading).
_SEND_TIMEOUT = 10.0
#: Stop reading a connection's requests while this many response bytes wait to be sent.
MAX_PENDING_OUTPUT = 16 << 20


class ControlHooks(Protocol):
    """What the daemon provides beyond the pool: the operations that act on the daemon."""

    def status(self) -> dict[str, Any]: ...

    async def scale(self, size: int) -> None: ...

    async def reload(self) -> list[str]: ...

    async def drain(self) -> None: ...

    def shutdown(self, grace: float | None) -> None: ...


class Request(msgspec.Struct, frozen=True):
    """One request line. Fields an op does not use are ignored."""

    id: int | str
    op: str
    #: Raw JSON; empty when absent (msgspec cannot put Raw in a union with None).
    action: msgspec.Raw = msgspec.Raw()
    timeout: float | None = None
    max_attempts: int | None = None
    target: int | str | None = None
    size: int | None = None
    grace: float | None = None


_decode_requests = msgspec.json.Decoder(Request).decode_lines
#: Stands in `pending` for a job whose answer this connection's reader is reading itself.
_ANSWERING: Any = object()
_decode_request = msgspec.json.Decoder(Request).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _error_line(id_json: bytes, err: dict[str, Any]) -> bytes:
    return b'{"id":%b,"ok":false,"error":%b}\n' % (id_json, _encode(err))


def _result_line(id_json: bytes, result: Any) -> bytes:
    return b'{"id":%b,"ok":true,"result":%b}\n' % (id_json, _encode(result))


# -- connections -------------------------------------------------------------------------------


class _Connection:
    """One client: reads its requests, runs them, writes their responses as they come."""

    def __init__(self, server: ControlServer, sock: trio.socket.SocketType) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.writer_task: trio.lowlevel.Task | None = None
        self.drained: trio.Event | None = None
        #: Submits still waiting for their outcome, by the JSON text of their id.
        self.pending: dict[bytes, Job] = {}
        self.open = True

    # Sink side: called by the pool with outcomes of this connection's submits.
    def result(self, job: Job, payload: msgspec.Raw, worker: Any) -> None:
        self.pending.pop(job.tag, None)
        self.send(b'{"id":%b,"ok":true,"result":%b}\n' % (job.tag, payload))

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Any) -> None:
        pop = self.pending.pop
        lines = []
        for job, payload in zip(jobs, payloads, strict=True):
            pop(job.tag, None)
            lines.append(b'{"id":%b,"ok":true,"result":%b}\n' % (job.tag, payload))
        self.send(b"".join(lines))

    def error(self, job: Job, err: ActionError, worker: Any) -> None:
        self.pending.pop(job.tag, None)
        self.send(_error_line(job.tag, err.to_wire()))

    def send(self, data: bytes) -> None:
        if not self.open:
            return
        if not self.out and self.writer_task is not None:
            # The writer is idle: write at once, from here, rather than wake it (a task hop
            # per answer). Whatever the socket does not take, the writer sends in order.
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.gone()
                return
            if sent == len(data):
                return
            data = data[sent:]
        self.out.append(data)
        self.out_bytes += len(data)
        task = self.writer_task
        if task is not None:
            self.writer_task = None
            trio.lowlevel.reschedule(task)

    async def write(self) -> None:
        """The writer task: sends queued responses, a batch per send, until cancelled."""
        try:
            while True:
                if not self.out:
                    if self.drained is not None:
                        self.drained.set()
                    self.writer_task = trio.lowlevel.current_task()

                    def abort(_: Any) -> trio.lowlevel.Abort:
                        self.writer_task = None
                        return trio.lowlevel.Abort.SUCCEEDED

                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                data = b"".join(self.out)
                self.out.clear()
                self.out_bytes = 0
                # Shielded, so a cancelled writer never leaves half a line; bounded, so a
                # client that stopped reading cannot hold us.
                with trio.CancelScope(shield=True), trio.move_on_after(_SEND_TIMEOUT) as send:
                    await _send_all(self.sock, data)
                if send.cancelled_caught:
                    log.warning("control.client_not_reading")
                    self.gone()
                    return
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.gone()

    async def final_flush(self) -> None:
        """Write what is still owed, even while the daemon is being torn down (bounded).
        Runs after the writer task has ended, so it is the only sender."""
        with trio.CancelScope(shield=True), trio.move_on_after(_SEND_TIMEOUT):
            while self.out and self.open:
                data = b"".join(self.out)
                self.out.clear()
                self.out_bytes = 0
                try:
                    await _send_all(self.sock, data)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    self.gone()

    async def flushed(self) -> None:
        """Return once every queued response has been written (or the client is gone)."""
        while self.out and self.open:
            self.drained = trio.Event()
            await self.drained.wait()

    def gone(self) -> None:
        """The client disconnected: its queued actions are cancelled; running ones finish."""
        if self.open:
            self.open = False
            self.out.clear()
            if self.pending:
                self.server.pool.withdraw(self)
                self.pending.clear()

    # -- requests ------------------------------------------------------------------------

    def handle(self, request: Request, nursery: trio.Nursery) -> None:
        id_json = _encode(request.id)
        op = request.op
        try:
            if op == "submit":
                self._submit(request, id_json)
            elif op == "status":
                self.send(_result_line(id_json, self.server.hooks.status()))
            elif op == "cancel":
                self._cancel(request, id_json)
            elif op == "hello":
                self.send(_result_line(id_json, self.server.hello()))
            elif op in ("scale", "reload", "drain"):
                # In the server's nursery: the operation completes even if this client
                # goes away meanwhile (its answer is then dropped).
                self.server.nursery.start_soon(self._slow_op, request, id_json)
            elif op == "shutdown":
                grace = request.grace
                if grace is not None and not (isinstance(grace, float) and grace >= 0):
                    raise BadRequest("grace must be a number of seconds >= 0")
                self.send(_result_line(id_json, {"stopping": True}))
                self.server.hooks.shutdown(grace)
            else:
                raise UnknownOp(f"unknown op {op!r}; ops: {', '.join(OPS)}")
        except RequestError as exc:
            self.send(_error_line(id_json, exc.to_wire()))
        except ActionError as exc:  # shutting_down at submission
            self.send(_error_line(id_json, exc.to_wire()))

    def _check_submit(self, request: Request, id_json: bytes) -> None:
        if not request.action:
            raise BadRequest("submit needs an action")
        if id_json in self.pending:
            raise BadRequest(f"id {id_json.decode()} is already in flight on this connection")
        attempts = request.max_attempts
        if attempts is not None and not 1 <= attempts <= 100:
            raise BadRequest("max_attempts must be an integer from 1 to 100")

    async def submit_direct(self, request: Request) -> None:
        """A lone submit on an idle pool: this task runs it on a worker and answers it."""
        id_json = _encode(request.id)
        try:
            self._check_submit(request, id_json)
            self.pending[id_json] = _ANSWERING
            job = await self.server.pool.submit_direct(
                bytes(request.action),
                self,
                id_json,
                timeout=request.timeout,
                max_attempts=request.max_attempts,
            )
        except (RequestError, ActionError) as exc:
            self.pending.pop(id_json, None)
            self.send(_error_line(id_json, exc.to_wire()))
            return
        if id_json in self.pending:  # not answered yet: it was queued, or is being retried
            self.pending[id_json] = job

    def _submit(self, request: Request, id_json: bytes) -> None:
        self._check_submit(request, id_json)
        job = self.server.pool.submit_nowait(
            bytes(request.action),
            self,
            id_json,
            timeout=request.timeout,
            max_attempts=request.max_attempts,
        )
        self.pending[id_json] = job

    def _cancel(self, request: Request, id_json: bytes) -> None:
        if request.target is None:
            raise BadRequest("cancel needs a target: the id of an earlier submit")
        job = self.pending.get(_encode(request.target))
        if job is not None:
            self.server.pool.cancel(job)
        self.send(_result_line(id_json, {"cancelled": job is not None}))

    async def _slow_op(self, request: Request, id_json: bytes) -> None:
        hooks = self.server.hooks
        try:
            if request.op == "scale":
                size = request.size
                if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 1024:
                    raise BadRequest("scale needs size: an integer from 1 to 1024")
                await hooks.scale(size)
                self.send(_result_line(id_json, {"size": size}))
            elif request.op == "reload":
                self.send(_result_line(id_json, {"changed": await hooks.reload()}))
            else:
                await hooks.drain()
                self.send(_result_line(id_json, {"drained": True}))
                hooks.shutdown(None)  # the daemon writes every owed answer before it exits
        except Qoper8Error as exc:
            self.send(_error_line(id_json, exc.to_wire()))

    def fatal(self, code: str, message: str) -> None:
        """A line we cannot answer by id: one error line, then the connection closes."""
        self.send(_error_line(b"null", {"code": code, "message": message}))

    def bad_line(self, line: bytes) -> bool:
        """Answer a line that did not decode as a request; False if the connection must end."""
        try:
            value = _decode_any(line)
        except msgspec.DecodeError as exc:
            self.fatal("bad_request", f"not JSON: {exc}")
            return False
        except RecursionError:
            # Valid JSON, perhaps, but nested deeper than anyone needs: refuse the line.
            self.send(_error_line(b"null", {"code": "bad_request", "message": _TOO_DEEP}))
            return True
        id_json = b"null"
        if isinstance(value, dict):
            given = value.get("id")
            if isinstance(given, int | str) and not isinstance(given, bool):
                id_json = _encode(given)
        try:
            _decode_request(line)
        except msgspec.ValidationError as exc:
            reason = str(exc).replace("$.", "")
        else:  # pragma: no cover - it decoded alone after all
            reason = "malformed request"
        if not isinstance(value, dict):
            reason = "a request is a JSON object"
        self.send(_error_line(id_json, {"code": "bad_request", "message": reason}))
        return True


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


class ControlServer:
    """A running control socket, as `serve_control` reports it when it starts."""

    def __init__(self, pool: Pool, hooks: ControlHooks, config: ServerConfig, path: Path) -> None:
        self.pool = pool
        self.hooks = hooks
        self.config = config
        self.path = path
        self.allowed = {os.getuid(), 0, *config.allowed_uids}
        self.connections: set[_Connection] = set()
        #: Where connections and operations outliving their connection run.
        self.nursery: trio.Nursery

    async def flushed(self) -> None:
        """Return once every response owed to a connected client has been written."""
        for conn in list(self.connections):
            await conn.flushed()

    def hello(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "server": "qoper8d",
            "version": __version__,
            "pid": os.getpid(),
            "ops": list(OPS),
            "max_message_bytes": self.config.max_message_bytes,
        }

    async def accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        failed = 0  # accept() failures in a row: logged when they start and when they end
        short = 0  # connections turned away in a row to keep descriptors for the workers
        turned_away = _error_line(
            b"null",
            {
                "code": "too_many_connections",
                "message": "the daemon is short of file descriptors (RLIMIT_NOFILE)",
            },
        )
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                # Out of descriptors or memory: the connections we have will free some.
                # The client waits in the backlog meanwhile; it is not lost.
                if not failed:
                    log.error("control.accept_failed", error=os.strerror(exc.errno or 0))
                failed += 1
                await trio.sleep(0.1)
                continue
            if failed:
                log.info("control.accepting", failed_accepts=failed)
                failed = 0
            if short_of_fds(sock.fileno()):
                # Keeping it would leave too few descriptors to replace a worker: turn it away
                # here and now, so that a flood of clients cannot take them either.
                if not short:
                    log.warning("control.short_of_descriptors", keeping=SPARE)
                short += 1
                with contextlib.suppress(OSError):
                    os.write(sock.fileno(), turned_away)
                sock.close()
                continue
            if short:
                log.info("control.accepting", turned_away=short)
                short = 0
            nursery.start_soon(self.serve_connection, sock)

    async def serve_connection(self, sock: trio.socket.SocketType) -> None:
        """One client, start to end. Nothing that goes wrong here may reach the daemon: an
        unexpected error closes this connection (and is logged), never the server."""
        try:
            await self._serve_connection(sock)
        except Exception as exc:
            log.error(
                "control.connection_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc
            )

    async def _serve_connection(self, sock: trio.socket.SocketType) -> None:
        conn = _Connection(self, sock)
        with sock:
            try:
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(conn.write)
                    refusal = self._refusal(sock)
                    if refusal is None:
                        self.connections.add(conn)
                        try:
                            await self._read(conn, tasks)
                        finally:
                            self.connections.discard(conn)
                    else:
                        conn.fatal(*refusal)
                    with trio.move_on_after(5):
                        await conn.flushed()
                    tasks.cancel_scope.cancel()
            finally:
                # Outcomes delivered as the daemon is torn down (a failing pool ends what
                # ran elsewhere) are owed to this client too: the writer is gone by now.
                await conn.final_flush()

    def _refusal(self, sock: trio.socket.SocketType) -> tuple[str, str] | None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in self.allowed:
            log.warning("control.forbidden", uid=uid, pid=pid)
            return ("forbidden", f"uid {uid} may not use this socket (server.allowed_uids)")
        if len(self.connections) >= self.config.max_connections:
            log.warning("control.too_many_connections", limit=self.config.max_connections)
            return (
                "too_many_connections",
                f"{self.config.max_connections} connections are open (server.max_connections)",
            )
        # The descriptors the workers need come first (a pool scaled up past what the limit
        # was raised for at start, or a limit lowered since): clients get what is left.
        room = connection_room(self.pool.size)
        if len(self.connections) >= room:
            log.warning("control.too_many_connections", limit=max(room, 0), by="RLIMIT_NOFILE")
            return (
                "too_many_connections",
                f"{len(self.connections)} connections are open, and the file descriptor "
                "limit (RLIMIT_NOFILE) keeps the rest for the workers",
            )
        return None

    async def _read(self, conn: _Connection, tasks: trio.Nursery) -> None:
        fd = conn.fd
        limit = self.config.max_message_bytes
        buf = bytearray()
        scanned = 0  # no newline in buf[:scanned]
        partial_since: float | None = None
        # After answering, poll for the client's next request for `pool.idle_spin` before
        # sleeping in epoll: a client sending one request at a time has it here within
        # tens of microseconds, and waking a sleeping daemon costs about as much again.
        spin_until = 0.0
        while conn.open:
            if conn.out_bytes > MAX_PENDING_OUTPUT:
                # The client is not reading its responses: stop taking requests until it does.
                await conn.flushed()
                continue
            # A plain read on the non-blocking socket first, epoll only when it is empty: a
            # trio socket's recv, and a cancel scope per read, cost more than the request.
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                if not buf:
                    if spin_until:
                        if time.perf_counter() < spin_until:
                            # Give this CPU to the client, if it is waiting for one.
                            os.sched_yield()
                            await trio.lowlevel.checkpoint()
                            continue
                        spin_until = 0.0
                    await trio.lowlevel.wait_readable(fd)
                    continue
                # A partial line must be finished within server.read_timeout.
                if partial_since is None:
                    partial_since = trio.current_time()
                with trio.move_on_at(partial_since + self.config.read_timeout) as waiting:
                    await trio.lowlevel.wait_readable(fd)
                if waiting.cancelled_caught:
                    conn.fatal(
                        "read_timeout",
                        f"a request line was not finished within {self.config.read_timeout:g}"
                        " s (server.read_timeout)",
                    )
                    return
                continue
            except OSError:  # reset by the peer, say: it is gone
                conn.gone()
                return
            if not data:
                if buf:
                    conn.fatal("bad_request", "the connection ended inside a request line")
                await self._ended(conn)
                return
            buf += data
            end = buf.rfind(b"\n", scanned)
            if end < 0:
                scanned = len(buf)
                if len(buf) > limit:
                    conn.fatal("too_large", f"a request line is over {limit} bytes")
                    return
                continue
            complete = bytes(buf[: end + 1])
            del buf[: end + 1]
            scanned = 0
            partial_since = None
            if not await self._requests(conn, complete, tasks, limit):
                return
            if spin := self.pool.config.idle_spin:
                spin_until = time.perf_counter() + spin
            if len(buf) > limit:
                conn.fatal("too_large", f"a request line is over {limit} bytes")
                return
            if len(data) >= _BUSY_READ:
                # Requests are streaming in: let everyone else run before reading on.
                await trio.lowlevel.checkpoint()

    async def _requests(
        self, conn: _Connection, chunk: bytes, tasks: trio.Nursery, limit: int
    ) -> bool:
        """Handle every complete line in `chunk`; False if the connection must close."""
        try:
            requests = _decode_requests(chunk)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            requests = None
        if requests is not None and len(chunk) <= limit:
            if len(requests) == 1 and requests[0].op == "submit":
                await conn.submit_direct(requests[0])
                return True
            for request in requests:
                conn.handle(request, tasks)
            return True
        # Something in the chunk is wrong: go line by line to answer each as it deserves.
        for line in chunk.split(b"\n")[:-1]:
            if not line.strip():
                continue
            if len(line) > limit:
                conn.fatal("too_large", f"a request line is over {limit} bytes")
                return False
            try:
                request = _decode_request(line)
            except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
                if not conn.bad_line(line):
                    return False
                continue
            conn.handle(request, tasks)
        return True

    async def _ended(self, conn: _Connection) -> None:
        # End of file: either the client closed its socket (it is gone: cancel its queued
        # work) or it only shut down its sending side and still reads: answer everything.
        poller = select.poll()
        poller.register(conn.sock.fileno(), select.POLLHUP)
        hung_up = any(event & select.POLLHUP for _, event in poller.poll(0))
        if hung_up:
            conn.gone()
            return
        while conn.open and conn.pending:
            conn.drained = trio.Event()
            await conn.drained.wait()
        await conn.flushed()


async def serve_control(
    pool: Pool,
    hooks: ControlHooks,
    config: ServerConfig,
    *,
    task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `config.socket_path()` and serve clients until cancelled; reports the
    `ControlServer` once listening."""
    path = config.socket_path()
    group = group_id(config.socket_group)
    secure_directory(path.parent, group)
    held = lock(path)
    server = ControlServer(pool, hooks, config, path)
    identity = -1
    try:
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            first = True
            while True:
                listener = trio.socket.from_stdlib_socket(bind(path, group))
                identity = os.stat(path).st_ino
                watcher = watch(path)
                try:
                    with listener:
                        accepting = trio.CancelScope()
                        nursery.start_soon(_accept, server, listener, nursery, accepting)
                        log.info("control.listening", socket=str(path))
                        if first:
                            first = False
                            task_status.started(server)
                        await removed(watcher, path, identity)
                        accepting.cancel()
                        log.warning("control.socket_removed", socket=str(path))
                finally:
                    if watcher is not None:
                        watcher.close()
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == identity:
                path.unlink()
        os.close(held)


async def _accept(
    server: ControlServer,
    listener: trio.socket.SocketType,
    nursery: trio.Nursery,
    scope: trio.CancelScope,
) -> None:
    with scope:
        await server.accept_loop(listener, nursery)
