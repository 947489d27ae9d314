"""The qoper8d service: a pool, its control socket, snapshots and signals, in one trio run.

Start-up order is the contract: logging, then every worker ready, then the socket bound —
so a client that can connect can be served. The socket path is checked before the first
worker starts, though (its length, its directory, what is in the way, the lock), so a path
that cannot work fails the start at once, not after every worker was started for nothing.
Then `daemon.started` (the banner, unless `monitor.silent_start`) and, under systemd
(`NOTIFY_SOCKET`), READY=1.

Stopping: SIGTERM, SIGINT, the `shutdown` op or the end of a `drain` closes intake (new
submissions end `shutting_down`), lets running and queued work finish for
`pool.grace_period`, ends what is left `shutting_down`, stops the workers, and writes every
response still owed to a client before the socket closes. A second SIGTERM or SIGINT cuts
the grace period short. SIGHUP reloads the configuration file, like the `reload` op.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import trio

from qoper8d._fds import ensure_fd_limit, open_fd_count
from qoper8d._socketfile import group_id, preflight
from qoper8d._version import __version__
from qoper8d.config import Config, changes, load_config
from qoper8d.control import ControlServer, serve_control
from qoper8d.errors import ConfigError, single_error
from qoper8d.monitor import LogWriter, serve_snapshots
from qoper8d.pool import Pool, open_pool

if TYPE_CHECKING:
    from qoper8d._node import Node

__all__ = ["Daemon", "config_changes"]

log = structlog.get_logger("qoper8d.daemon")


def config_changes(old: Config, new: Config) -> list[str]:
    """Every key whose value differs, as `section.key: old -> new`."""
    return [line for name in Config.__struct_fields__ for line in _section_changes(old, new, name)]


def _section_changes(old: Config, new: Config, name: str) -> list[str]:
    return changes(getattr(old, name), getattr(new, name), name)


def _sd_notify(message: str) -> None:
    """Tell systemd (or whoever set NOTIFY_SOCKET) how we are doing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:  # the socket too: out of descriptors, systemd goes without news, not the daemon down
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("daemon.notify_failed", error=str(exc))


def _set_title(title: str) -> None:
    """What `ps` shows for this process."""
    import setproctitle

    setproctitle.setproctitle(title)


@asynccontextmanager
async def _cluster_link(cfg: Config) -> AsyncIterator[Any]:
    """With `[cluster] backend = "redis"`: the connection to Redis, made before any worker
    starts (`Unavailable`, exit 7, if it cannot be). Otherwise None, and nothing imported."""
    if cfg.cluster.backend == "none":
        yield None
        return
    from qoper8d._link import open_link
    from qoper8d._node import node_name

    async with open_link(cfg.cluster, node_name(cfg.cluster)) as link:
        yield link


class Daemon:
    """Runs the service until it is told to stop. `run()` raises what prevents a start:
    `WorkerStartError`, `SocketInUse`; and `RestartIntensityExceeded` if the pool fails."""

    def __init__(self, config: Config, config_path: Path | None, logs: LogWriter) -> None:
        self.config = config
        self.config_path = config_path
        self._logs = logs
        self._pool: Pool | None = None
        self._control: ControlServer | None = None
        self._node: Node | None = None
        self._stop = trio.Event()
        self._grace: float | None = None
        self._graceful: trio.CancelScope | None = None
        self._reloading = trio.Lock()

    # -- the control hooks -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self._pool is not None
        snapshot: dict[str, Any] = msgspec.to_builtins(self._pool.statistics())
        snapshot["daemon"] = {
            "pid": os.getpid(),
            "version": __version__,
            "socket": str(self.config.server.socket_path()),
            "config": str(self.config_path) if self.config_path else None,
            # Leak indicators an operator (and the fault tests) can watch over time.
            "connections": len(self._control.connections) if self._control else 0,
            "unsent_bytes": self._control.unsent_bytes() if self._control else 0,
            "tasks": trio.lowlevel.current_statistics().tasks_living,
            "open_fds": open_fd_count(),  # even with none left to count them with
        }
        snapshot["cluster"] = self._node.status() if self._node else {"backend": "none"}
        return snapshot

    async def scale(self, size: int) -> int:
        assert self._pool is not None
        # The descriptors the new workers need, or a refusal naming the limit (ConfigError).
        ensure_fd_limit(size, self.config.server.max_connections)
        reached = await self._pool.scale(size)
        log.info("daemon.scaled", size=reached)
        return reached

    def size(self) -> int:
        assert self._pool is not None
        return self._pool.size

    async def reload(self) -> list[str]:
        """Re-read the configuration file and apply it; the changes, one line each.

        The pool compares the file with what it runs (a `scale` since the start included)
        and applies the difference by replacing workers one at a time, its turn taken among
        resizes; `server.*` needs a restart. An invalid file raises `ConfigError` and
        changes nothing.
        """
        assert self._pool is not None
        if self.config_path is None:
            return []
        async with self._reloading:
            new = load_config(self.config_path)
            ensure_fd_limit(new.pool.size, self.config.server.max_connections)
            applied = await self._pool.reconfigure(new.pool, new.supervisor)
            later = [
                f"{change} (takes effect after a restart)"
                for change in _section_changes(self.config, new, "server")
            ]
            notes = applied + later + _section_changes(self.config, new, "monitor")
            self.config = msgspec.structs.replace(
                new, server=self.config.server, pool=self._pool.config
            )
            if notes:
                log.info("daemon.reloaded", changes=notes)
            return notes

    async def drain(self) -> None:
        assert self._pool is not None
        log.info("daemon.draining")
        await self._pool.drain()

    def shutdown(self, grace: float | None) -> None:
        if self._stop.is_set():
            # Asked again while stopping: stop now.
            if self._graceful is not None:
                self._graceful.cancel()
            return
        self._grace = grace
        self._stop.set()

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except BaseExceptionGroup as group:
            raise single_error(group) from None

    async def _run(self) -> None:
        async with trio.open_nursery() as background:
            background.start_soon(self._logs.serve)
            # Signals are ours from the start: a SIGTERM while workers start stops cleanly.
            background.start_soon(self._signals, background)
            try:
                await self._serve()
            finally:
                background.cancel_scope.cancel()

    async def _serve(self) -> None:
        cfg = self.config
        _set_title(f"qoper8d: master {cfg.server.socket_path()}")
        preflight(cfg.server.socket_path(), group_id(cfg.server.socket_group))
        async with (
            _cluster_link(cfg) as link,
            open_pool(config=cfg.pool, supervisor=cfg.supervisor) as pool,
        ):
            self._pool = pool
            async with trio.open_nursery() as nursery:
                if link is not None:
                    from qoper8d._node import Node

                    self._node = Node(link, pool, cfg.cluster)
                    await nursery.start(self._node.serve)
                self._control = await nursery.start(
                    serve_control, pool, self, cfg.server, self._node
                )
                nursery.start_soon(
                    serve_snapshots, self.status, lambda: self.config.monitor.interval
                )
                if not cfg.monitor.silent_start:
                    self._banner()
                _sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {pool.size} workers")
                await self._stop.wait()
                _sd_notify("STOPPING=1")
                await self._stop_gracefully(pool)
                nursery.cancel_scope.cancel()

    async def _stop_gracefully(self, pool: Pool) -> None:
        grace = self.config.pool.grace_period if self._grace is None else self._grace
        log.info("daemon.stopping", grace_period=grace)
        if self._control is not None:
            self._control.refuse_changes()
        node = self._node
        if node is not None:
            node.stop_taking()
        with trio.move_on_after(grace) as self._graceful:
            await pool.drain()
            if node is not None:
                await node.drained()
        await pool.stop(0)
        if node is not None:
            with trio.move_on_after(5):  # what the pool cut short: replies, entries put back
                await node.drained_held()
            node.give_up()
        # Every accepted action has its outcome now; make sure its client hears it.
        if self._control is not None:
            with trio.move_on_after(5):
                await self._control.flushed()
        log.info("daemon.stopped", outcomes=pool.statistics().outcomes)

    async def _signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("daemon.signal", signal=name, action="reload")
                    nursery.start_soon(self._reload_logged)
                else:
                    now = "stop now" if self._stop.is_set() else "graceful stop"
                    log.info("daemon.signal", signal=name, action=now)
                    self.shutdown(None)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("daemon.reload_failed", errors=exc.details.get("errors", [exc.message]))

    def _banner(self) -> None:
        cfg = self.config
        log.info(
            "daemon.started",
            version=__version__,
            pid=os.getpid(),
            socket=str(cfg.server.socket_path()),
            config=str(self.config_path) if self.config_path else None,
            size=cfg.pool.size,
            handler=cfg.pool.handler,
            start_method=cfg.pool.start_method,
            max_batch_bytes=cfg.pool.max_batch_bytes,
            monitor_interval=cfg.monitor.interval,
        )
