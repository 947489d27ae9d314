"""Q-Oper8's web front, in Python: HTTP requests answered by a pool of worker processes.

    python examples/web_front.py --port 8080 --size 4
    curl 'http://127.0.0.1:8080/test/?a=1&b=2'

Q-Oper8's README showed a Node HTTP server that turned each request's query string into an
action, queued it with `addToQueue(requestObj, handler)` and, when a child answered,
wrote a page with the child's result and pid from the response handler. This is the same
shape on trio: hypercorn serves a hand-written ASGI app; the app queues the query with
`pool.add_to_queue(request, on_response)`, where `request["action"]` is all that travels to a
worker and the rest of the request (here the `Reply` the HTTP task waits on) stays in this
process. The master never blocks on a handler: a slow action holds one worker, not the server.

Routes: `GET /test/?<query>` runs the query through `handlers.web:handle` and shows the
action, the result and the worker's pid; an action that fails gives an error page naming its
outcome code (status 500; 503 when the pool is full or stopping, 504 on a timeout); every
other path is 404. `/test/?fail=boom` shows the error page; `/test/?sleep=5` holds one worker
for five seconds while other requests are still answered at once.

On start, one line `listening on http://HOST:PORT` goes to stdout once the socket accepts
connections (`--port 0` picks a free port; the line has the real one). SIGINT or SIGTERM
stops gracefully: no new connections, requests in progress finish, then the workers stop and
the program exits 0. A second signal stops at once (exit 1). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import html
import json
import signal
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.trio
import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

import qoper8d

#: The project root: put on the workers' import path so `handlers.web` is found from any cwd.
ROOT = Path(__file__).resolve().parent.parent
HANDLER = "handlers.web:handle"
#: More fields than this in one query string is refused (400) rather than sent to a worker.
MAX_FIELDS = 100
#: The HTTP status for an action that ended without a result, by outcome code; others: 500.
ERROR_STATUS = {"queue_full": 503, "shutting_down": 503, "timeout": 504}
#: Pages are built from escaped text only; these headers make sure nothing else runs.
PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'none'"),
]


@dataclass
class Reply:
    """The master-side half of one request: where `on_response` leaves the outcome.

    It rides in the request dict next to `"action"`, so the pool keeps it here and never
    sends it to a worker (it could not: an event is not JSON).
    """

    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    pid: int | None = None


def on_response(request: dict[str, Any], result: Any, pid: int | None) -> None:
    """Hand the outcome to the HTTP task waiting for it, and return at once.

    Q-Oper8 wrote the HTTP response right here. We don't: the pool runs callbacks one at a
    time in a single task, so writing to one slow client from here would hold up the answers
    of every other request. The request's own task writes its page instead.
    """
    reply: Reply = request["reply"]
    reply.result = result
    reply.pid = pid
    reply.done.set()


def query_to_action(query: bytes) -> dict[str, Any]:
    """`a=1&b=2` -> `{"a": "1", "b": "2"}`; a repeated key gives the list of its values.

    That is what Node's `url.parse(url, true).query` gave Q-Oper8's example. Raises
    `ValueError` past `MAX_FIELDS` fields, so one URL cannot make an action of any size.
    """
    values: dict[str, list[str]] = {}
    pairs = urllib.parse.parse_qsl(
        query.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FIELDS
    )
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    return {key: found[0] if len(found) == 1 else found for key, found in values.items()}


def _show(value: Any) -> str:
    """JSON text of `value`, escaped for HTML: everything on a page goes through here."""
    return html.escape(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


def _page(title: str, body: str) -> bytes:
    return (
        "<!doctype html>\n"
        '<html lang="en">\n'
        f'<head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f"<body>\n{body}</body>\n</html>\n"
    ).encode()


def result_page(action: Any, result: Any, pid: int | None) -> bytes:
    """The page for an action that ended with a result."""
    return _page(
        "qoper8d: result",
        f'<h1>Result from worker <span class="pid">{html.escape(str(pid))}</span></h1>\n'
        f'<h2>Action</h2>\n<pre class="action">{_show(action)}</pre>\n'
        f'<h2>Result</h2>\n<pre class="result">{_show(result)}</pre>\n',
    )


def error_page(status: int, error: qoper8d.Qoper8Error, action: Any, pid: int | None) -> bytes:
    """The page for an action that ended without a result: its code and message.

    The traceback of a `handler_error` stays in the server's hands (it is in `error.details`):
    errors reach clients as data, a code and a message, never as a dump of our internals.
    """
    kind = getattr(error, "type", "")
    message = f"{kind}: {error.message}" if kind else error.message
    where = "" if pid is None else f' in worker <span class="pid">{html.escape(str(pid))}</span>'
    return _page(
        f"qoper8d: {status} {error.code}",
        f'<h1>{status}: <span class="code">{html.escape(error.code)}</span></h1>\n'
        f'<p class="message">{html.escape(message)}{where}</p>\n'
        f'<h2>Action</h2>\n<pre class="action">{_show(action)}</pre>\n',
    )


def message_page(status: int, text: str) -> bytes:
    """A page for a request that never became an action (404, 405, 400)."""
    return _page(f"qoper8d: {status}", f"<h1>{status}</h1>\n<p>{html.escape(text)}</p>\n")


async def _respond(
    send: ASGISendCallable,
    status: int,
    body: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    headers = [*PAGE_HEADERS, (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class WebFront:
    """The ASGI application: one pool, queried through `/test/`."""

    def __init__(self, pool: qoper8d.Pool) -> None:
        self._pool = pool

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            await self._http(scope, send)
        elif scope["type"] == "lifespan":
            # Answering lifespan events keeps hypercorn from logging that we lack support.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            # A WebSocket: closing before accepting makes the server refuse it with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": None})

    async def _http(self, scope: HTTPScope, send: ASGISendCallable) -> None:
        if scope["path"] not in ("/test", "/test/"):
            await _respond(send, 404, message_page(404, "Not found. Try /test/?a=1&b=2"))
            return
        if scope["method"] != "GET":
            await _respond(send, 405, message_page(405, "Only GET."), [(b"allow", b"GET")])
            return
        try:
            action = query_to_action(scope["query_string"])
        except ValueError as exc:
            await _respond(send, 400, message_page(400, str(exc)))
            return
        reply = Reply()
        try:
            self._pool.add_to_queue({"action": action, "reply": reply}, on_response)
        except qoper8d.Qoper8Error as exc:  # queue_full or shutting_down, refused at once
            status = ERROR_STATUS.get(exc.code, 500)
            await _respond(send, status, error_page(status, exc, action, None))
            return
        # Every accepted action ends exactly once, so this wait always ends; if the client
        # has gone meanwhile, the action still runs and its page goes nowhere.
        await reply.done.wait()
        if isinstance(reply.result, qoper8d.ActionError):
            status = ERROR_STATUS.get(reply.result.code, 500)
            await _respond(send, status, error_page(status, reply.result, action, reply.pid))
        else:
            await _respond(send, 200, result_page(action, reply.result, reply.pid))


class Shutdown:
    """SIGINT/SIGTERM: the first asks for a graceful stop, a second one stops at once."""

    def __init__(self) -> None:
        #: Set by the first signal: hypercorn's `shutdown_trigger` waits on it.
        self.requested = trio.Event()
        #: True once a second signal cancelled everything.
        self.forced = False

    async def watch(self, signals: AsyncIterator[int], everything: trio.CancelScope) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self.requested.is_set():
                print(f"{name}: stopping (send it again to stop at once)", file=sys.stderr)
                self.requested.set()
            else:
                print(f"{name} again: stopping at once", file=sys.stderr)
                self.forced = True
                everything.cancel()
                return


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"  # stderr, with our own logs; stdout carries only our two lines
    # hypercorn's default (3 s) would cut off a slow action that the pool, with its own
    # `grace_period` of 10 s, is still willing to finish.
    config.graceful_timeout = 10.0
    return config


async def serve_web_front(host: str, port: int, size: int) -> int:
    """Run the pool and the HTTP server until a signal; the exit code."""
    shutdown = Shutdown()
    # Opened before anything else, so a signal that arrives once we say "listening" is ours.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shutdown.watch, signals, nursery.cancel_scope)
            async with qoper8d.open_pool(HANDLER, size=size, handler_path=[str(ROOT)]) as pool:
                app = WebFront(pool)
                serve = partial(
                    hypercorn.trio.serve,
                    app,
                    hypercorn_config(host, port),
                    shutdown_trigger=shutdown.requested.wait,
                    mode="asgi",
                )
                async with trio.open_nursery() as http:
                    binds: list[str] = await http.start(serve)
                    print(f"listening on {binds[0]}", flush=True)
                # hypercorn has finished every request it accepted: nothing more will come.
                stats = pool.statistics()
            nursery.cancel_scope.cancel()  # the signal watcher, the only task left
    if shutdown.forced:
        return 1
    done = ", ".join(f"{n} {code}" for code, n in stats.outcomes.items() if n) or "none"
    print(f"stopped; actions: {done}", flush=True)
    return 0


def _int_from(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an int from `low` to `high`, so a bad value is a usage error."""

    def convert(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    return convert


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=_int_from(0, 65535), default=8080, help="0 picks a free port (default 8080)"
    )
    parser.add_argument(
        "--size", type=_int_from(1, 1024), default=4, help="worker processes (default 4)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    # structlog prints to stdout unless told otherwise; stdout is for our own lines.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    code = 1
    try:
        code = trio.run(serve_web_front, options.host, options.port, options.size)
    except* qoper8d.Qoper8Error as group:
        print(f"web_front: {group.exceptions[0]}", file=sys.stderr)
    except* OSError as group:  # most likely the port is taken
        print(f"web_front: {group.exceptions[0]}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
