"""A node's connection to Redis: connected or not, and getting back with backoff.

`open_link` connects (or raises `Unavailable`: the daemon then exits 7 before a worker
starts), makes sure the stream and its consumer group exist, and runs the reconnector.
Every task that talks to Redis calls through `call` or catches `LOST` itself, tells the
link with `lost()` and waits in `up()`: one task reconnects for all of them, with capped
exponential backoff and jitter, and logs the outage once when it starts and once when it
ends. coredis's own retries are off: a command that may have run is never sent twice.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import coredis
import coredis.exceptions
import coredis.retry
import structlog
import trio

from qoper8d import _streams
from qoper8d._streams import Keys
from qoper8d._wakeup import Wakeup
from qoper8d.config import ClusterConfig
from qoper8d.errors import Unavailable

__all__ = ["LOST", "Link", "Refused", "open_link"]

log = structlog.get_logger("qoper8d.cluster")

#: What a lost or refused connection raises, in coredis and below it.
LOST: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,
    coredis.exceptions.ReadOnlyError,
    TimeoutError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
#: What keeps a node from starting: no Redis, or one that refuses (auth, an old version).
_FAILED_START: tuple[type[BaseException], ...] = (*LOST, coredis.exceptions.RedisError)
#: Seconds to connect; a command's answer may take `_ANSWER` (a stalled Redis is lost).
_CONNECT = 2.0
_ANSWER = 10.0
#: Seconds a task pauses after Redis refused a command.
_REFUSED = 1.0
#: Backoff between reconnection attempts: from `_FIRST` doubling to `_MOST` seconds.
_FIRST = 0.05
_MOST = 2.0
_SCRIPTS = ("SUBMIT", "REPLY", "PROGRESS", "CANCEL", "RENEW", "RECLAIM", "REQUEUE", "BEAT", "SWEEP")


class Refused(Unavailable):
    """Redis answered a script call with an error: it is there, but it refused this call.

    `too_long`: the refusal was a protocol error, which is what Redis answers a command with
    an argument longer than its `proto-max-bulk-len` (512 MB by default; lowered by hand, it
    may be as little as 1 MB): Redis ran nothing of it, and the same call would be refused
    for ever, so the caller sends less at a time instead. Any other refusal (out of memory,
    a key of ours gone) may pass, and is retried after a pause.
    """

    def __init__(self, message: str, *, too_long: bool) -> None:
        super().__init__(message)
        self.too_long = too_long


#: What a refusal for a command's length says (Redis: "Protocol error: invalid bulk length").
_TOO_LONG = "Protocol error"


def redacted(url: str) -> str:
    """`url` without its password, for logs and status."""
    head, sep, rest = url.partition("://")
    user, at, host = rest.rpartition("@")
    if not at:
        return url
    name = user.partition(":")[0]
    return f"{head}{sep}{name}:***@{host}" if name else f"{head}{sep}***@{host}"


class Link:
    """The client, its scripts, and whether Redis answers (see the module docstring)."""

    def __init__(self, config: ClusterConfig, node: str, client: coredis.Redis[bytes]) -> None:
        self.config = config
        self.keys = Keys(config.stream, node)
        self.client = client
        self.scripts = {name: client.register_script(getattr(_streams, name)) for name in _SCRIPTS}
        self.connected = True
        #: Times the connection was lost, and when it was last (re)established.
        self.outages = 0
        self.since = trio.current_time()
        self._broken = Wakeup()
        self._back: trio.Event = trio.Event()
        self._back.set()

    async def call(self, script: str, keys: list[Any], args: list[Any]) -> Any:
        """Run one of `_streams`' scripts; `Unavailable` if Redis is lost meanwhile, or
        `Refused` (one) if it refuses the call (see `refused`)."""
        try:
            return await self.scripts[script](keys=keys, args=args)
        except LOST as exc:
            self.lost(exc)
            raise Unavailable(f"lost the connection to Redis: {exc}") from None
        except coredis.exceptions.RedisError as exc:
            too_long = _TOO_LONG in str(exc)
            if too_long:
                log.error("cluster.redis_error", command=script, error=str(exc), too_long=True)
            else:
                await self.refused(exc, script)
            raise Refused(f"Redis refused {script}: {exc}", too_long=too_long) from None

    async def refused(self, exc: BaseException, what: str) -> None:
        """Redis answered with an error, not for want of a connection: out of memory, a key
        of ours deleted or overwritten by someone else. Logged, the stream and its group
        made again if they are gone, and a pause, so that a task retrying does not spin;
        the daemon carries on."""
        log.error("cluster.redis_error", command=what, error=str(exc))
        with contextlib.suppress(*_FAILED_START):
            await ensure_group(self.client, self.keys)
        await trio.sleep(_REFUSED)

    def lost(self, exc: BaseException) -> None:
        """A command failed for want of Redis: new submits are refused until it is back."""
        if not self.connected:
            return
        self.connected = False
        self.outages += 1
        self._back = trio.Event()
        log.warning("cluster.disconnected", url=redacted(self.config.url), error=str(exc))
        self._broken.wake()

    async def up(self) -> None:
        """Return once Redis answers again (at once if it does)."""
        await self._back.wait()

    async def serve(self) -> None:
        """Reconnect whenever a task reports the connection lost."""
        while True:
            await self._broken.wait()
            delay = _FIRST
            attempts = 0
            while True:
                attempts += 1
                try:
                    await ensure_group(self.client, self.keys)
                    break
                except LOST as exc:
                    if attempts == 1:
                        log.info("cluster.reconnecting", error=str(exc))
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _MOST)
            self.connected = True
            self.since = trio.current_time()
            self._back.set()
            log.info("cluster.connected", url=redacted(self.config.url), attempts=attempts)


async def ensure_group(client: coredis.Redis[bytes], keys: Keys) -> None:
    """The stream and its group, created if missing; from the stream's start, so that
    entries added before any node ran are taken too."""
    with trio.fail_after(_ANSWER):
        with contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError):
            await client.xgroup_create(keys.stream, keys.group, "0", mkstream=True)


@asynccontextmanager
async def open_link(config: ClusterConfig, node: str) -> AsyncIterator[Link]:
    """Connect to `config.url` as `node`; `Unavailable` if Redis cannot be reached."""
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        config.url,
        connect_timeout=_CONNECT,
        stream_timeout=_ANSWER,
        retry_policy=coredis.retry.NoRetryPolicy(),
    )
    where = redacted(config.url)
    failure: BaseException | None = None
    try:
        async with client:
            try:
                await ensure_group(client, Keys(config.stream, node))
            except _FAILED_START as exc:
                failure = exc
            else:
                link = Link(config, node, client)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.serve)
                    yield link
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The client's own task group wraps what passes through it: give back the error.
        from qoper8d.errors import single_error

        raise single_error(group) from None
    if failure is not None:
        raise Unavailable(f"cannot reach Redis at {where} (cluster.url): {failure}")
