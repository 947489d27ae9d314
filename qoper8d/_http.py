"""The operators' HTTP listener (`[http]`): metrics, the status snapshot, a live page.

An ASGI application of a few routes, served by hypercorn on the daemon's own trio run, in
its nursery. Read-only, and for counts and states only: every local user can reach a
loopback port, so nothing an action, a result or a traceback holds is ever served.

| route          | what                                                       |
|----------------|------------------------------------------------------------|
| `GET /metrics` | Prometheus text exposition (`qoper8d._metrics`)            |
| `GET /status`  | the status snapshot as JSON, as the `status` op gives it   |
| `GET /`        | the status page (`qoper8d/_static/status.html`)            |
| `GET /events`  | server-sent events: one snapshot per `http.push_interval`  |

Every other path is 404, every other method (HEAD included) 405. Hardening, each bound
named where it is set:

- The `Host` header must name the listener (DNS rebinding): its own address and port, on
  loopback `localhost`/`127.0.0.1`/`[::1]` with that port, or an `http.allowed_hosts`
  name with that port; anything else is 421 before the path is even looked at.
- At most `http.max_connections` connections at once (counted in the daemon's descriptor
  budget); the next one is answered 503 and closed before a byte of it is read. hypercorn's
  `serve()` has no such bound, so `serve_http` runs hypercorn's own per-connection server
  (`TCPServer`) under trio's `serve_listeners` itself, with one; that is hypercorn's
  internal API, hence the extra's upper bound on its version.
- At most `http.max_clients` event streams at once; the next client gets 503.
- A stream holds one rendered snapshot at a time, sent and awaited before the next is
  made: a client that stops reading fills its socket buffers, never the daemon's memory.
  hypercorn's sends cannot be cancelled (it shields them), so the kernel ends such a
  connection: the listening socket carries `TCP_USER_TIMEOUT = http.write_timeout`, which
  the accepted ones inherit; and when the listener stops, every connection is shut down at
  once, so that no such send holds up the daemon's stop.
- hypercorn's own limits: a request head of at most `MAX_HEAD_BYTES`; a connection lives
  `http.keep_alive_timeout` without a request in progress (a slow head included); HTTP/2
  (prior knowledge on plain TCP) at most `MAX_STREAMS` streams and a bounded header list;
  no WebSocket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from typing import Any, cast

import msgspec
import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import wrap_app

from qoper8d._metrics import CONTENT_TYPE, open_registry, render
from qoper8d._socketfile import SocketInUse
from qoper8d.config import HttpConfig, is_loopback
from qoper8d.stats import PoolStatistics

__all__ = ["MAX_HEAD_BYTES", "MAX_STREAMS", "HttpServer", "bind_http", "serve_http"]

log = structlog.get_logger("qoper8d.http")

#: Bytes of request line and headers hypercorn buffers before it answers 431.
MAX_HEAD_BYTES = 16 * 1024
#: Concurrent streams on one HTTP/2 connection.
MAX_STREAMS = 8
#: Seconds a browser waits before reconnecting a dropped event stream (its `retry:`).
RECONNECT_MS = 2000

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_COMMON = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
]
# The page runs its own inline script and style and talks to its own origin only.
_PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    ),
    (b"referrer-policy", b"no-referrer"),
]


def bind_http(config: HttpConfig) -> socket.socket:
    """The listening socket, bound now (before any worker starts, so that a taken port
    fails the start at once); `SocketInUse` names the address when it cannot be had."""
    address = config.address()
    assert address is not None
    host, port = address
    host = "127.0.0.1" if host == "localhost" else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Inherited by every accepted socket: see the module's docstring.
        timeout_ms = max(1, round(config.write_timeout * 1000))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SocketInUse(f"http.listen {config.listen!r}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class _Hypercorn(HypercornConfig):
    """hypercorn's configuration: its limits, its logs in ours."""

    def __init__(self, config: HttpConfig) -> None:
        super().__init__()
        self.h11_max_incomplete_size = MAX_HEAD_BYTES
        self.h2_max_concurrent_streams = MAX_STREAMS
        self.h2_max_header_list_size = MAX_HEAD_BYTES
        self.keep_alive_timeout = config.keep_alive_timeout
        # No read timeout: an event stream's client sends nothing after its request.
        self.read_timeout = None
        self.include_server_header = False
        self.accesslog = None
        self.errorlog = _error_logger()
        self.loglevel = "WARNING"


class _ToStructlog(logging.Handler):
    """hypercorn's error log as `http.server` events in the daemon's own log."""

    def emit(self, record: logging.LogRecord) -> None:
        log.log(record.levelno, "http.server", message=record.getMessage())


def _error_logger() -> logging.Logger:
    logger = logging.getLogger("qoper8d.http.hypercorn")
    logger.handlers = [_ToStructlog()]
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    return logger


def _accepted_hosts(config: HttpConfig, host: str, port: int) -> frozenset[str]:
    """Every `Host` header value naming this listener, lower case."""
    names = {host.lower(), *(name.lower().strip("[]") for name in config.allowed_hosts)}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "::1"}
    accepted: set[str] = set()
    for name in names:
        shown = f"[{name}]" if ":" in name else name
        accepted.add(f"{shown}:{port}")
        if port == 80:  # a client leaves out the default port
            accepted.add(shown)
    return frozenset(accepted)


class HttpServer:
    """The ASGI application and what it counts; `url` once it listens."""

    def __init__(
        self,
        config: HttpConfig,
        status: Callable[[], dict[str, Any]],
        statistics: Callable[[], PoolStatistics],
        daemon: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.config = config
        self.url: str | None = None
        self.connections = 0
        self.event_clients = 0
        self._status = status
        self._hosts: frozenset[str] = frozenset()
        self._registry = open_registry(statistics, lambda: {**daemon(), **self.numbers()})
        self._page = resources.files("qoper8d").joinpath("_static/status.html").read_bytes()

    def listening(self, host: str, port: int) -> None:
        self._hosts = _accepted_hosts(self.config, host, port)
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def numbers(self) -> dict[str, int]:
        return {"http_connections": self.connections, "http_event_clients": self.event_clients}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No lifespan scope: serve_http runs no lifespan (the daemon is the application's life).
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            # Closed before it is accepted: hypercorn answers the handshake with 403.
            await receive()
            await send({"type": "websocket.close"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = next((v for k, v in scope["headers"] if k == b"host"), b"")
        if host.decode("latin-1").lower() not in self._hosts:
            await _plain(send, 421, b"this listener does not serve that host\n")
            return
        route = _ROUTES.get(scope["path"])
        if route is None:
            await _plain(send, 404, b"not found\n")
            return
        if scope["method"] != "GET":
            await _plain(send, 405, b"only GET\n", [(b"allow", b"GET")])
            return
        await route(self, receive, send)

    async def _metrics(self, receive: Receive, send: Send) -> None:
        await _whole(send, 200, render(self._registry), [(b"content-type", CONTENT_TYPE.encode())])

    async def _status_json(self, receive: Receive, send: Send) -> None:
        body = msgspec.json.encode(self._status())
        await _whole(send, 200, body, [(b"content-type", b"application/json")])

    async def _index(self, receive: Receive, send: Send) -> None:
        await _whole(send, 200, self._page, _PAGE_HEADERS)

    async def _events(self, receive: Receive, send: Send) -> None:
        if self.event_clients >= self.config.max_clients:
            await _plain(send, 503, b"too many event streams\n", [(b"retry-after", b"5")])
            return
        self.event_clients += 1
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*_COMMON, (b"content-type", b"text/event-stream")],
                }
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                first = b"retry: %d\n" % RECONNECT_MS
                while True:
                    body = first + b"data: " + msgspec.json.encode(self._status()) + b"\n\n"
                    first = b""
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    await trio.sleep(self.config.push_interval)
        finally:
            self.event_clients -= 1


_ROUTES: dict[str, Callable[[HttpServer, Receive, Send], Awaitable[None]]] = {
    "/": HttpServer._index,
    "/metrics": HttpServer._metrics,
    "/status": HttpServer._status_json,
    "/events": HttpServer._events,
}


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    # A request body sent anyway is read and dropped (hypercorn queues a bounded few chunks).
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _whole(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [*_COMMON, *headers]})
    await send({"type": "http.response.body", "body": body})


async def _plain(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    await _whole(send, status, body, [(b"content-type", b"text/plain; charset=utf-8"), *headers])


#: Pending connections the kernel holds for the listener.
BACKLOG = 128
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


async def serve_http(
    server: HttpServer,
    sock: socket.socket,
    *,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `server` on `sock` (from `bind_http`) until cancelled; `http.listening` says
    where (the port chosen, for port 0)."""
    host, port = sock.getsockname()[:2]
    server.listening(host, port)
    config = _Hypercorn(server.config)
    app = wrap_app(cast("ASGIFramework", server), config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    limit = server.config.max_connections
    streams: set[trio.SocketStream] = set()

    async def connection(stream: trio.SocketStream) -> None:
        if server.connections >= limit:
            # Answered without waiting (a fresh socket's buffer takes it), so that a flood
            # past the bound holds no descriptor longer than it takes to close it.
            with contextlib.suppress(OSError):
                os.write(stream.socket.fileno(), _BUSY)
            await stream.aclose()
            return
        server.connections += 1
        streams.add(stream)
        try:
            # Typed as TLS streams only, it serves plain ones too (hypercorn's serve() does).
            tcp = cast("trio.SSLStream[trio.SocketStream]", stream)
            await TCPServer(app, config, context, ConnectionState({}), tcp)
        finally:
            streams.discard(stream)
            server.connections -= 1

    sock.listen(BACKLOG)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_abort_when_cancelled, streams)
        await nursery.start(trio.serve_listeners, connection, [listener])
        log.info("http.listening", url=server.url, host=host, port=port)
        task_status.started(server)


async def _abort_when_cancelled(streams: set[trio.SocketStream]) -> None:
    """When the listener stops, end every connection at once: a send hypercorn shields
    would otherwise hold the daemon's stop until its client read or `http.write_timeout`."""
    try:
        await trio.sleep_forever()
    finally:
        for stream in streams:
            with contextlib.suppress(OSError):
                stream.socket.shutdown(socket.SHUT_RDWR)
