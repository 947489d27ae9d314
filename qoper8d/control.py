"""The control socket: NDJSON requests in, responses out, as docs/protocol.md describes.

`serve_control` binds the socket only when it is called — after the pool's workers are ready —
and reports `task_status.started(server)` once it listens. It runs until cancelled. The socket
file itself (a private directory, a lock, reclaiming, re-binding) is `_socketfile`'s job;
each client's reading, bounds and writing are `_connection`'s; every peer's uid is checked
here (SO_PEERCRED) before it may send anything, and each op is a function in `_OPS`.

`submit` actions reach the pool decoded (so that nothing a worker cannot decode is accepted)
and results come back as raw JSON, spliced into response lines without being decoded.
Nothing a client sends can reach the daemon or another connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog
import trio

from qoper8d._connection import Connection, Request, error_line, result_line
from qoper8d._fds import SPARE, connection_room, short_of_fds
from qoper8d._socketfile import SocketInUse, bind, group_id, lock, removed, secure_directory, watch
from qoper8d._systemd import socket_name
from qoper8d._version import __version__
from qoper8d._wakeup import Wakeup
from qoper8d.config import ServerConfig
from qoper8d.errors import (
    ActionError,
    BadRequest,
    Qoper8Error,
    QueueFull,
    RequestError,
    ShuttingDown,
    UnknownOp,
)
from qoper8d.pool import Pool

if TYPE_CHECKING:
    from qoper8d._node import Node

__all__ = ["OPS", "PROTOCOL", "ControlHooks", "ControlServer", "SocketInUse", "serve_control"]

log = structlog.get_logger("qoper8d.control")

PROTOCOL = 1
#: accept() errors that mean "not now", not "never": wait a little and accept again.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: Resizes, reloads and drains that may wait for their turn at once; more get queue_full.
MAX_CHANGES = 256
#: Stands in `pending` for a job whose answer this connection's reader is reading itself.
_ANSWERING: Any = object()
_encode = msgspec.json.Encoder().encode


def _stopping() -> ShuttingDown:
    return ShuttingDown("the daemon is stopping: no more resizes, reloads or drains")


class ControlHooks(Protocol):
    """What the daemon provides beyond the pool: the operations that act on the daemon."""

    def status(self) -> dict[str, Any]: ...

    async def scale(self, size: int) -> int: ...

    def size(self) -> int: ...

    async def reload(self) -> list[str]: ...

    async def drain(self) -> None: ...

    def shutdown(self, grace: float | None) -> None: ...


class ControlServer:
    """A running control socket, as `serve_control` reports it when it starts."""

    def __init__(
        self, pool: Pool, hooks: ControlHooks, config: ServerConfig, node: Node | None = None
    ) -> None:
        self.pool = pool
        #: With `[cluster]`: submits go to the shared stream through it, not to the pool.
        self.node = node
        self.hooks = hooks
        self.config = config
        self.allowed = {os.getuid(), 0, *config.allowed_uids}
        self.connections: set[Connection] = set()
        #: Where connections and operations outliving their connection run.
        self.nursery: trio.Nursery
        #: Resizes, reloads and drains not yet done, in the order they came: one task runs
        #: them (`serve_changes`).
        self.changes: deque[tuple[Connection, Request, bytes]] = deque()
        self._changer = Wakeup()
        self._stopping = False

    async def flushed(self) -> None:
        """Return once every response owed to a connected client has been written."""
        for conn in list(self.connections):
            await conn.flushed()

    def _counted(self) -> int:
        """Connections that count toward `server.max_connections`: at the limit, those whose
        client has hung up already no longer do (their tasks have yet to notice), so a
        client that closes and connects again is never refused by its own old connection."""
        count = len(self.connections)
        if count < self.config.max_connections:
            return count
        poller = select.poll()
        for conn in self.connections:
            poller.register(conn.fd, select.POLLHUP)
        return count - len(poller.poll(0))

    def unsent_bytes(self) -> int:
        """Bytes of answers waiting for clients to read them."""
        return sum(conn.unsent for conn in self.connections)

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
        turned_away = error_line(
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
        conn = Connection(sock, self.config, self, self.pool.config.idle_spin)
        with sock:
            try:
                refusal = self._refusal(sock)
                if refusal is None:
                    self.connections.add(conn)
                    try:
                        await conn.serve()
                    finally:
                        self.connections.discard(conn)
                else:
                    conn.fatal(*refusal)
            finally:
                # What is still owed: a refusal, or outcomes delivered as the daemon is torn
                # down (a failing pool ends what ran elsewhere); the writer is gone by now.
                await conn.flush()

    def _refusal(self, sock: trio.socket.SocketType) -> tuple[str, str] | None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in self.allowed:
            log.warning("control.forbidden", uid=uid, pid=pid)
            return ("forbidden", f"uid {uid} may not use this socket (server.allowed_uids)")
        if self._counted() >= self.config.max_connections:
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

    # -- what connections ask of the server (`_connection.Front`) -------------------------

    def handle(self, conn: Connection, request: Request) -> None:
        id_json = _encode(request.id)
        op = _OPS.get(request.op)
        try:
            if op is None:
                raise UnknownOp(f"unknown op {request.op!r}; ops: {', '.join(OPS)}")
            op(self, conn, request, id_json)
        except (RequestError, ActionError) as exc:  # an ActionError: shutting_down at once
            conn.send(error_line(id_json, exc.to_wire()))

    async def submit_direct(self, conn: Connection, request: Request) -> None:
        """A lone submit on an idle pool: this task runs it on a worker and answers it."""
        id_json = _encode(request.id)
        if self.node is not None:
            self.handle(conn, request)
            return
        watched = False
        try:
            _check_submit(conn, request, id_json)
            job = self.pool.accept(
                request.action,
                conn,
                id_json,
                timeout=request.timeout,
                max_attempts=request.max_attempts,
            )
            conn.pending[id_json] = _ANSWERING
            if request.progress:
                conn.watch(id_json)
                watched = True
            await self.pool.run_here(job)
        except (RequestError, ActionError) as exc:
            conn.pending.pop(id_json, None)
            if watched:
                conn.watching.discard(id_json)
            conn.send(error_line(id_json, exc.to_wire()))
            return
        if id_json in conn.pending:  # not answered yet: it was queued, or is being retried
            conn.pending[id_json] = job

    def submit_all(self, conn: Connection, requests: list[Request]) -> bool:
        # The check is a pass over the requests; handling them one by one costs ten times
        # that in calls per request.
        if self.node is not None or not all(map(_plain_submit, requests)):
            return False
        ids = list(map(_encode, map(_id_of, requests)))
        pending = conn.pending
        if len(set(ids)) != len(ids) or not pending.keys().isdisjoint(ids):
            return False  # an id in flight twice: answered one by one
        try:
            jobs = self.pool.accept_batch(list(map(_action_of, requests)), conn, ids)
        except (RequestError, ActionError):
            return False  # queue_full for some, say: answered one by one
        pending.update(zip(ids, jobs, strict=True))
        return True

    def hold(self, conn: Connection) -> None:
        self.pool.hold(conn)

    def release(self, conn: Connection) -> None:
        self.pool.release(conn)

    def withdraw(self, conn: Connection) -> None:
        if self.node is not None:
            self.node.submits.withdraw(conn)
        else:
            self.pool.withdraw(conn)

    async def serve_changes(self) -> None:
        """Run resizes, reloads and drains one at a time, in the order they came (whichever
        client sent them; at most `MAX_CHANGES` wait). A resize with a later one waiting
        behind it is skipped: it answers `superseded`, with the size the pool has. Each
        completes even if its client goes away meanwhile (its answer is then dropped)."""
        changes = self.changes
        while True:
            if not changes:
                await self._changer.wait()
                continue
            conn, request, id_json = changes.popleft()
            try:
                if request.op == "reload":
                    result: Any = {"changed": await self.hooks.reload()}
                elif request.op == "drain":
                    await self.hooks.drain()
                    result = {"drained": True}
                elif any(later.op == "scale" for _, later, _ in changes):
                    result = {"size": self.hooks.size(), "superseded": True}
                else:
                    result = {"size": await self.hooks.scale(_size_of(request))}
            except Qoper8Error as exc:
                conn.send(error_line(id_json, exc.to_wire()))
                continue
            conn.send(result_line(id_json, result))
            if request.op == "drain":
                self.hooks.shutdown(None)  # the daemon writes every owed answer before it exits

    def refuse_changes(self) -> None:
        """The daemon is stopping: every resize, reload and drain still waiting, and any
        asked for from now on, ends `shutting_down`."""
        self._stopping = True
        while self.changes:
            conn, _, id_json = self.changes.popleft()
            conn.send(error_line(id_json, _stopping().to_wire()))

    def change(self, conn: Connection, request: Request, id_json: bytes) -> None:
        if self._stopping:
            raise _stopping()
        if len(self.changes) >= MAX_CHANGES:
            raise QueueFull(
                f"{len(self.changes)} resizes, reloads and drains are waiting already",
                max_changes=MAX_CHANGES,
            )
        self.changes.append((conn, request, id_json))
        self._changer.wake()


# -- the ops ----------------------------------------------------------------------------------


_id_of = attrgetter("id")
_action_of = attrgetter("action")


def _plain_submit(request: Request) -> bool:
    """A submit with an action and nothing else (the pool's time limit and attempts)."""
    return (
        request.op == "submit"
        and request.action is not msgspec.UNSET
        and request.timeout is None
        and request.max_attempts is None
        and not request.progress
    )


def _check_submit(conn: Connection, request: Request, id_json: bytes) -> None:
    if request.action is msgspec.UNSET:
        raise BadRequest("submit needs an action")
    if id_json in conn.pending:
        raise BadRequest(f"id {id_json.decode()} is already in flight on this connection")
    attempts = request.max_attempts
    if attempts is not None and not 1 <= attempts <= 100:
        raise BadRequest("max_attempts must be an integer from 1 to 100")


def _submit(server: ControlServer, conn: Connection, request: Request, id_json: bytes) -> None:
    _check_submit(conn, request, id_json)
    if server.node is not None:
        server.node.submits.submit(
            conn,
            id_json,
            request.action,
            request.timeout,
            request.max_attempts,
            progress=request.progress,
        )
        return
    job = server.pool.accept(
        request.action, conn, id_json, timeout=request.timeout, max_attempts=request.max_attempts
    )
    conn.pending[id_json] = job
    if request.progress:
        conn.watch(id_json)
    server.pool.enqueue(job)


def _status(server: ControlServer, conn: Connection, request: Request, id_json: bytes) -> None:
    conn.send(result_line(id_json, server.hooks.status()))


def _hello(server: ControlServer, conn: Connection, request: Request, id_json: bytes) -> None:
    conn.send(result_line(id_json, server.hello()))


def _cancel(server: ControlServer, conn: Connection, request: Request, id_json: bytes) -> None:
    if request.target is None:
        raise BadRequest("cancel needs a target: the id of an earlier submit")
    job = conn.pending.get(_encode(request.target))
    if job is not None:
        if server.node is not None:
            server.node.submits.cancel(job)
        else:
            server.pool.cancel(job)
    conn.send(result_line(id_json, {"cancelled": job is not None}))


def _size_of(request: Request) -> int:
    size = request.size
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 1024:
        raise BadRequest("scale needs size: an integer from 1 to 1024")
    return size


def _change(server: ControlServer, conn: Connection, request: Request, id_json: bytes) -> None:
    if request.op == "scale":
        _size_of(request)  # a bad size is refused now, not in its turn
    server.change(conn, request, id_json)


def _shutdown(server: ControlServer, conn: Connection, request: Request, id_json: bytes) -> None:
    grace = request.grace
    if grace is not None and not (isinstance(grace, float) and grace >= 0):
        raise BadRequest("grace must be a number of seconds >= 0")
    conn.send(result_line(id_json, {"stopping": True}))
    server.hooks.shutdown(grace)


_Op = Callable[[ControlServer, Connection, Request, bytes], None]
_OPS: dict[str, _Op] = {
    "hello": _hello,
    "submit": _submit,
    "cancel": _cancel,
    "status": _status,
    "scale": _change,
    "reload": _change,
    "drain": _change,
    "shutdown": _shutdown,
}
OPS = tuple(_OPS)


async def serve_control(
    pool: Pool,
    hooks: ControlHooks,
    config: ServerConfig,
    node: Node | None = None,
    *,
    inherited: socket.socket | None = None,
    task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `config.socket_path()` and serve clients until cancelled; reports the
    `ControlServer` once listening. An `inherited` listening socket (systemd's: socket
    activation) is served as it is instead: never locked, bound, chmod-ed, watched or
    unlinked."""
    if inherited is not None:
        await _serve_inherited(ControlServer(pool, hooks, config), inherited, task_status)
        return
    path = config.socket_path()
    group = group_id(config.socket_group)
    secure_directory(path.parent, group)
    held = lock(path)
    server = ControlServer(pool, hooks, config, node)
    identity = -1
    try:
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            nursery.start_soon(server.serve_changes)
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


async def _serve_inherited(
    server: ControlServer, sock: socket.socket, task_status: trio.TaskStatus[ControlServer]
) -> None:
    # Whoever made it owns its file: it outlives us, for whoever listens on it next.
    with trio.socket.from_stdlib_socket(sock) as listener:
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            nursery.start_soon(server.serve_changes)
            nursery.start_soon(server.accept_loop, listener, nursery)
            log.info("control.listening", socket=socket_name(sock), inherited=True)
            task_status.started(server)


async def _accept(
    server: ControlServer,
    listener: trio.socket.SocketType,
    nursery: trio.Nursery,
    scope: trio.CancelScope,
) -> None:
    with scope:
        await server.accept_loop(listener, nursery)
